"""Vendor kernels behind the same entry point, and `auto`, which picks the fastest one that
computes exactly what `reference` computes for the given call on the current backend.

  xla     jax.nn.dot_product_attention(implementation="xla") with an explicit mask/bias built
          from positions, segment ids and the pattern (the reference's rule). Any backend, any
          pattern, any positions (dense T x S).
  cudnn   jax.nn.dot_product_attention(implementation="cudnn") with the same explicit mask and
          ALiBi bias (is_causal is never set: cuDNN's causal mask is by token index), so it is
          exact for any positions and segments; GPU, fp16/bf16, causal or full patterns (other
          patterns are left to blockwise, which skips invisible blocks instead of masking them).
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu) — TPU. Its masks are built
          from token INDICES, not position ids, so it runs only where that is the same thing:
            full                    position-free: any positions;
            causal, sliding_window  only with `contiguous_positions=True`, the caller's promise
                                    that within each segment positions step by exactly 1 per
                                    token (0..T-1, or restarting per packed document). PoSE,
                                    randomized or any data-dependent positions break it (the
                                    window then covers the wrong keys), and a traced array
                                    cannot prove it, so the default is False and `attend`
                                    never sets it;
            lambda, attention_sinks, block_causal  never (their masks read absolute positions);
          and only for self-attention (one segment-id array — and for causal/sliding_window one
          position array — passed as both queries' and keys'), so that every row sees a key. No
          ALiBi. Under a mesh (jax.set_mesh) it runs per device in a shard_map (rows and kv
          heads split, the sequence whole), since XLA does not partition a Mosaic kernel.
          `CTXJAX_SPLASH_INTERPRET=1` runs the Pallas interpreter on CPU (tests).
  auto    TPU: splash if it is exact for the call (causal / sliding window: when the caller
          vouches for contiguous positions, as the train step does for packed data; the promise
          is checked on the device and a batch that breaks it gets NaN, never a different
          attention); GPU: cudnn likewise; else blockwise (exact for any positions).
          `select_kernel` is the decision, by the static facts of the call.
A forced kernel that cannot compute the call exactly raises a one-line ValueError naming the
reason and the alternative.
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ctxjax.attention import blockwise, context_parallel
from ctxjax.attention.api import register_implementation
from ctxjax.attention.reference import visibility_and_alibi

_SPLASH_BLOCK = 128
_SPLASH_BY_INDEX = ("causal", "sliding_window")   # masks that read positions via index order
_SPLASH_PATTERNS = ("full",) + _SPLASH_BY_INDEX


_POSED_PLATFORMS: list[str] = []


def _backend() -> str:
  """The platform kernels are chosen for (one function, so tests can pose as a GPU or TPU):
  this process's backend, or the one `kernels_for` names."""
  return _POSED_PLATFORMS[-1] if _POSED_PLATFORMS else jax.default_backend()


@contextlib.contextmanager
def kernels_for(platform: str | None):
  """Choose kernels for `platform` ("tpu", ...) while tracing: ctxjax.aot compiles a TPU
  program on a CPU host, and must compile the kernels a TPU run picks. None: no change."""
  if platform is None:
    yield
    return
  _POSED_PLATFORMS.append(platform)
  try:
    yield
  finally:
    _POSED_PLATFORMS.pop()


def _mask_and_bias(q_positions, k_positions, q_segment_ids, k_segment_ids, pattern, alibi_slopes,
                   num_heads):
  """Dense [B, 1, T, S] visibility mask and [B, H, T, S] ALiBi bias (or None): the reference's
  rule (`visibility_and_alibi`) on jax.nn.dot_product_attention's [B, H, T, S] layout."""
  slopes = None
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, num_heads, 1, 1)
  return visibility_and_alibi(pattern, q_positions[:, None, :, None], k_positions[:, None, None, :],
                              q_segment_ids[:, None, :, None], k_segment_ids[:, None, None, :],
                              slopes)


def _dpa(implementation, q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
         pattern, alibi_slopes, scale):
  mask, bias = _mask_and_bias(q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                              alibi_slopes, q.shape[2])
  if bias is not None:
    bias = bias.astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                     implementation=implementation)
  # A row that sees no key: jax returns mean(V); the ctxjax contract is 0.
  seen = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
  return jnp.where(seen, out, 0).astype(q.dtype)


@register_implementation("xla")
def xla_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                  alibi_slopes=None, scale=None):
  return _dpa("xla", q, k, v, q_positions=q_positions, k_positions=k_positions,
              q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
              alibi_slopes=alibi_slopes, scale=scale)


def cudnn_unsupported(q, k, *, pattern, alibi_slopes=None, **_) -> str | None:
  """Why cuDNN cannot run this call exactly, or None if it can (positions and segments reach it
  as an explicit mask, so they never make it wrong)."""
  if _backend() != "gpu":
    return f"cudnn attention needs a GPU backend (this is {_backend()!r})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cudnn attention needs bfloat16/float16 inputs, got {q.dtype}"
  if pattern.kind not in ("causal", "full"):
    return f"cudnn attention supports patterns causal/full, not {pattern.kind!r}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"cudnn attention needs head_dim <= 128 and a multiple of 8, got {q.shape[-1]}"
  return None


@register_implementation("cudnn")
def cudnn_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                    alibi_slopes=None, scale=None):
  reason = cudnn_unsupported(q, k, pattern=pattern, alibi_slopes=alibi_slopes)
  if reason:
    raise ValueError(reason + "; use impl='auto' (falls back to blockwise) or impl='xla'")
  return _dpa("cudnn", q, k, v, q_positions=q_positions, k_positions=k_positions,
              q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
              alibi_slopes=alibi_slopes, scale=scale)


def _splash_interpret() -> bool:
  return os.environ.get("CTXJAX_SPLASH_INTERPRET", "") == "1"


def splash_unsupported(q, k, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                       alibi_slopes=None, contiguous_positions=False, **_) -> str | None:
  """Why splash attention cannot compute this call exactly, or None if it can. Decided from
  what is known at trace time: shapes, the pattern, which arrays are passed, the caller's flag."""
  if _backend() != "tpu" and not _splash_interpret():
    return f"splash attention needs a TPU backend (this is {_backend()!r})"
  if alibi_slopes is not None:
    return "splash attention has no ALiBi bias"
  if pattern.kind not in _SPLASH_PATTERNS:
    return (f"splash attention supports patterns {'/'.join(_SPLASH_PATTERNS)}, not "
            f"{pattern.kind!r} (its mask reads absolute positions)")
  if q.shape[1] % _SPLASH_BLOCK or k.shape[1] % _SPLASH_BLOCK:
    return (f"splash attention needs lengths divisible by {_SPLASH_BLOCK}, got "
            f"{q.shape[1]} and {k.shape[1]}")
  by_index = pattern.kind in _SPLASH_BY_INDEX
  if q.shape[1] != k.shape[1] or q_segment_ids is not k_segment_ids or (
      by_index and q_positions is not k_positions):
    return ("splash attention needs self-attention: one segment-id array"
            + (" and one position array" if by_index else "") + " passed for queries and keys")
  if by_index and not contiguous_positions:
    return (f"splash attention builds its {pattern.kind} mask from token indices, which equals "
            "the position rule only for positions that step by 1 within each segment; pass "
            "contiguous_positions=True only for such positions (not PoSE/randomized)")
  return None


def splash_density(pattern, seq_len: int) -> float:
  """The fraction of splash's block pairs (_SPLASH_BLOCK tokens square) that `pattern` keeps
  at self-attention length `seq_len`: n(n+1)/2 of n^2 causal, a band of about window/block + 1
  blocks per row for a sliding window, all of them for `full` (the roofline's splash cost)."""
  n = max(1, seq_len // _SPLASH_BLOCK)
  if pattern.kind == "causal":
    return (n + 1) / (2 * n)
  if pattern.kind == "sliding_window":
    return min(1.0, (-(-(pattern.window - 1) // _SPLASH_BLOCK) + 1) / n)
  return 1.0


def _splash_kernel(kind: str, window: int | None, group: int, q_len: int, kv_len: int,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (q_len, kv_len)
  if kind == "causal":
    mask = sm.CausalMask(shape)
  elif kind == "sliding_window":
    mask = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  else:
    mask = sm.FullMask(shape)
  block = sk.BlockSizes(
      block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK,
      block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=_SPLASH_BLOCK, block_kv_dq=_SPLASH_BLOCK)
  # One kv head serves `group` query heads: the MQA form of splash, vmapped over kv heads.
  # Built afresh in every trace that calls it (its mask tables are numpy work, cached by
  # splash itself): the kernel holds its mask metadata as arrays, and a kernel kept across
  # traces leaked one trace's values into the next (UnexpectedTracerError under a scanned,
  # differentiated layer), even built under jax.ensure_compile_time_eval.
  return sk.make_splash_mqa(sm.MultiHeadMask([mask] * group), block_sizes=block,
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                     alibi_slopes=None, scale=None, contiguous_positions=False):
  """contiguous_positions: the caller's static promise that positions step by exactly 1 per
  token within each segment (module docstring), taken on trust here; `auto` checks it."""
  reason = splash_unsupported(q, k, q_positions=q_positions, k_positions=k_positions,
                              q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                              pattern=pattern, alibi_slopes=alibi_slopes,
                              contiguous_positions=contiguous_positions)
  if reason:
    raise ValueError(reason + "; use impl='auto' (falls back to blockwise), 'blockwise' or 'xla'")
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  group = num_heads // num_kv
  scale = head_dim ** -0.5 if scale is None else scale
  kernel = _splash_kernel(pattern.kind, getattr(pattern, "window", None), group, q_len,
                          k.shape[1], _splash_interpret())
  q_BKGTD = (q * scale).reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
  k_BKSD, v_BKSD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one(q_GTD, k_SD, v_SD, q_seg, k_seg):
    return kernel(q_GTD, k_SD, v_SD, segment_ids=sk.SegmentIds(q=q_seg, kv=k_seg))

  def local(q_BKGTD, k_BKSD, v_BKSD, q_seg, k_seg):  # one device's rows and kv heads
    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None, None))          # over kv heads
    return jax.vmap(per_kv)(q_BKGTD, k_BKSD, v_BKSD, q_seg, k_seg)  # over batch

  out = _per_device(local, q_BKGTD, k_BKSD, v_BKSD, q_segment_ids, k_segment_ids)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


@register_implementation("splash")
def _forced_splash(q, k, v, **kwargs):
  """attend(impl="splash"): no contiguous_positions parameter, so `attend` never hands its
  promise to this unchecked path (a causal call is refused; `auto` uses the promise, checked)."""
  return splash_attention(q, k, v, **kwargs)


def _per_device(local, q_BKGTD, k_BKSD, v_BKSD, q_seg, k_seg):
  """`local` on each device's rows and kv heads under the current mesh (jax.set_mesh). XLA does
  not partition a Mosaic kernel (lowering one under a sharded jit fails: "Mosaic kernels cannot
  be automatically partitioned"), so it runs in a shard_map: rows over the mesh axes that divide
  the batch, kv heads over the HEAD_AXES that divide them, the sequence whole on each device
  (context_parallel.default_spec's rule without a sequence axis)."""
  mesh = context_parallel.current_mesh()
  if (mesh is None or getattr(mesh, "empty", True) or mesh.size == 1
      or getattr(mesh, "manual_axes", ())):  # no mesh, one device, or already per device
    return local(q_BKGTD, k_BKSD, v_BKSD, q_seg, k_seg)
  batch, num_kv, group, q_len, head_dim = q_BKGTD.shape
  spec = context_parallel.default_spec(mesh, (batch, q_len, num_kv * group, head_dim),
                                       (batch, k_BKSD.shape[2], num_kv, head_dim), axis_name=None)
  qkv, rows = P(spec[0], spec[2]), P(spec[0])  # [B, K, ...] and [B, T]
  fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows, rows), out_specs=qkv,
                     check_vma=False)
  return fn(q_BKGTD, k_BKSD, v_BKSD, q_seg, k_seg)


def select_kernel(q, k, *, contiguous_positions=False, **kwargs) -> str:
  """`auto`'s choice for this call: "splash" (TPU) / "cudnn" (GPU) where exact, else
  "blockwise". kwargs: the kernel's keyword arguments (positions, segment ids, pattern, ...)."""
  backend = _backend()
  if backend == "tpu" and not splash_unsupported(q, k, contiguous_positions=contiguous_positions,
                                                 **kwargs):
    return "splash"
  if backend == "gpu" and not cudnn_unsupported(q, k, **kwargs):
    return "cudnn"
  return "blockwise"


def contiguous_by_segment(positions_BT, segment_ids_BT) -> jax.Array:
  """bool scalar: in every row, position - token index is one constant per segment id, so a
  causal or sliding-window mask built from token indices (splash's) equals the position rule.
  Checked as: a token and its same-segment neighbour differ by exactly 1 in position, and each
  segment id forms one run (runs along the row == distinct ids, counted after a sort). Packed
  rows (positions per document, or 0..T-1) pass; PoSE / randomized positions, padding at
  position 0 and a segment id that comes back later in the row do not."""
  pos, seg = positions_BT, segment_ids_BT
  same = seg[:, 1:] == seg[:, :-1]
  steps_by_one = jnp.all(~same | (pos[:, 1:] == pos[:, :-1] + 1))
  runs = 1 + jnp.sum(~same, axis=1)
  ordered = jnp.sort(seg, axis=1)
  distinct = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
  return steps_by_one & jnp.all(runs == distinct)


@register_implementation("auto")
def auto_attention(q, k, v, *, contiguous_positions=False, **kwargs):
  """The fastest kernel that computes exactly the reference's result for this call.

  contiguous_positions=True (the model's training step vouches for packed data: see
  `attend`) lets a TPU run splash for causal / sliding-window patterns; the promise is checked
  on the device (`contiguous_by_segment`) and a batch that breaks it gets NaN outputs, never
  a silently different attention."""
  choice = select_kernel(q, k, contiguous_positions=contiguous_positions, **kwargs)
  if choice == "splash":
    out = splash_attention(q, k, v, contiguous_positions=contiguous_positions, **kwargs)
    if contiguous_positions and kwargs["pattern"].kind in _SPLASH_BY_INDEX:
      kept = contiguous_by_segment(kwargs["q_positions"], kwargs["q_segment_ids"])
      out = jnp.where(kept, out, jnp.nan).astype(out.dtype)
    return out
  if choice == "cudnn":
    return cudnn_attention(q, k, v, **kwargs)
  return blockwise.blockwise_attention(q, k, v, **kwargs)
