"""Which parameters train: regexes over '/'-joined parameter paths (`optim.trainable`).

LongLoRA trains the adapters plus the embeddings and norms (Chen et al. 2024, fine-tune.py
`--trainable_params embed,norm`, a substring match; here a `re.search`):
  optim.trainable = ["lora_", "embed_tokens", "norm"]
Paths look like `layers_0/self_attn/q_proj/lora_a`, `layers/layer/input_layernorm/scale`,
`embed_tokens/embedding`. An empty list trains everything. The quantized frozen base
(`kernel_int8` / `kernel_nf4` / `kernel_absmax`, ctxjax/model/quant.py) and any non-float leaf
never train; a pattern that selects one is an error, as is a pattern that matches nothing.

Frozen parameters get no optimizer state: `only_trainable` runs the optimizer on the trainable
leaves alone (frozen ones get zero updates), so Adam keeps moments for the adapters only, and
gradient clipping sees only their gradients. `value_and_grad` differentiates the
trainable leaves alone: the frozen ones are closed over behind stop_gradient, so no weight
gradient is computed for them and integer leaves never reach jax.grad.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ctxjax.model.quant import FROZEN_PARAMS as QUANTIZED_BASE


def _path(key_path) -> str:
  """'/'-joined dict keys of a tree path (flax's LogicallyPartitioned boxes add no key)."""
  return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _never_trains(path: str, leaf) -> bool:
  if _is_box(leaf):
    leaf = leaf.unbox()
  return path.rsplit("/", 1)[-1] in QUANTIZED_BASE or not jnp.issubdtype(
      jnp.result_type(leaf), jnp.inexact)


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise ValueError(f"optim.trainable must be a list of regexes, got the string {patterns!r}")
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except (re.error, TypeError) as e:
      raise ValueError(f"optim.trainable pattern {p!r} is not a valid regex: {e}") from None
  return out


def _flags(tree, regexes: list[re.Pattern]) -> list[bool]:
  """Per parameter (a flax box counts as one), in flatten order: does it train?"""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
  paths = [_path(kp) for kp, _ in leaves]
  for regex in regexes:
    hits = [(p, leaf) for p, (_, leaf) in zip(paths, leaves) if regex.search(p)]
    if not hits:
      raise ValueError(f"optim.trainable pattern {regex.pattern!r} matches no parameter; "
                       f"parameter paths look like {sorted(paths)[:6]}")
    frozen = [p for p, leaf in hits if _never_trains(p, leaf)]
    if frozen:
      raise ValueError(f"optim.trainable pattern {regex.pattern!r} selects the frozen "
                       f"quantized base (or non-float parameters) {frozen[:4]}; those never train")
  return [not _never_trains(p, leaf) and (not regexes or any(r.search(p) for r in regexes))
          for p, (_, leaf) in zip(paths, leaves)]


def trainable_mask(params, patterns: Sequence[str]):
  """A tree of bools like `params`: True where the '/'-path matches one of `patterns` (all
  float leaves when `patterns` is empty), never for the quantized base or non-float leaves."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_box)
  flags = _flags(params, _compile(patterns))
  return treedef.unflatten([jax.tree.map(lambda _: f, x) for x, f in zip(leaves, flags)])


def _select(tree, flags):
  """`tree` with the unflagged parameters replaced by None (an empty subtree)."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_box)
  return treedef.unflatten([x if f else None for x, f in zip(leaves, flags)])


def only_trainable(tx: optax.GradientTransformation, patterns: Sequence[str]
                   ) -> optax.GradientTransformation:
  """`tx` on the parameters `patterns` selects; the rest get zero updates and no state.
  With no patterns, `tx` itself (every parameter trains).

  `tx` runs on the tree with the frozen parameters replaced by None, so its state holds the
  trainable ones only (and, unlike optax.masked's MaskedNode placeholders, None subtrees pass
  through flax's logical-axis sharding helpers)."""
  patterns = tuple(patterns or ())
  if not patterns:
    return tx
  regexes = _compile(patterns)  # a bad regex fails now, not at the first tx.init

  def init_fn(params):
    return tx.init(_select(params, _flags(params, regexes)))

  def update_fn(updates, state, params=None):
    flags = _flags(updates, regexes)
    trained, state = tx.update(_select(updates, flags), state,
                               None if params is None else _select(params, flags))
    new = iter(jax.tree.leaves(trained, is_leaf=_is_box))
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_box)
    return treedef.unflatten([next(new) if f else jax.tree.map(jnp.zeros_like, u)
                              for u, f in zip(leaves, flags)]), state
  return optax.GradientTransformation(init_fn, update_fn)


def value_and_grad(fun: Callable, mask, *, has_aux: bool = False) -> Callable:
  """Like jax.value_and_grad(fun, has_aux=has_aux) for fun(params, *args), differentiating only
  the leaves where `mask` is True. Frozen leaves get zero gradients of their own dtype, so the
  result plugs into `only_trainable` optimizers (which discard them)."""
  def wrapped(params, *args):
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(mask)
    if len(flags) != len(leaves):
      raise ValueError(f"mask has {len(flags)} leaves, params {len(leaves)}")

    def f(trained):
      it = iter(trained)
      full = [next(it) if m else jax.lax.stop_gradient(x) for x, m in zip(leaves, flags)]
      return fun(jax.tree.unflatten(treedef, full), *args)

    out, grads = jax.value_and_grad(f, has_aux=has_aux)(
        [x for x, m in zip(leaves, flags) if m])
    it = iter(grads)
    full = [next(it) if m else jnp.zeros_like(x) for x, m in zip(leaves, flags)]
    return out, jax.tree.unflatten(treedef, full)
  return wrapped
