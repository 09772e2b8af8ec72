"""XLA compiler options for every program ctxjax compiles, per platform; `jit` applies them.

XLA:CPU (jax 0.10) routes dots and some multiply-reduce patterns through YNNPACK fusions by
default (`xla_cpu_experimental_ynn_fusion_type`). ctxjax compiles its CPU programs with them
off, for two measured reasons:
- speed: XLA's own dot emitter trains the tiny model 12-20% faster at T=256 and 25-33% faster
  at T=1024 on this project's first CPU machine and 16% faster at both lengths on a Zen 4 EPYC
  (benchmarks/README.md, "Training throughput", "XLA:CPU options on your CPU"); perplexity
  scoring took 1.16x longer with XLA's defaults at T=1024 and 16384 and generation's 4K prefill
  0.69 s instead of 0.56 (Zen 4; benchmarks/README.md, "Decoding");
- correctness: jaxlib 0.10.2 (which ctxjax's tests run on; the issue reports 0.10.1 right)
  returns wrong values on CPU for some batched dots followed by a reduction inside these fusions
  (jax-ml/jax#39103: `vmap(lambda r: sum((eye(3) @ r) ** 2))` over 32,769 rows puts row
  32,640's value in the last row); with the fusions off the result is exact
  (tests/test_xla_options.py runs that reproducer).
Options go to each program's `jax.jit(compiler_options=...)`: nothing process-wide changes, and
other platforms (GPU, TPU, an AOT TPU topology compiled on a CPU host) get XLA's defaults. A
user's own XLA_FLAGS setting of an option wins; CTXJAX_XLA_DEFAULTS=1 keeps XLA's defaults
everywhere. `python benchmarks/xla_options.py` compares option sets on any CPU, in one process.
"""
from __future__ import annotations

import functools
import os

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def platform_options(mesh=None) -> dict | None:
  """ctxjax's options for a program that runs on `mesh`'s devices (None: the default backend);
  None means XLA's defaults."""
  if os.environ.get("CTXJAX_XLA_DEFAULTS", "") == "1":
    return None
  platform = (mesh.devices.flat[0].platform if mesh is not None and hasattr(mesh, "devices")
              else jax.default_backend())
  if platform != "cpu":
    return None
  user_flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in CPU_OPTIONS.items() if k not in user_flags}
  return options or None


class _Jitted:
  """jax.jit(fun, compiler_options=platform_options(), **jit_kwargs), made at the first call
  or `.lower`: the options depend on the backend, and asking for it at import (where
  decorators run) would start JAX's backends before a user's jax.distributed.initialize or
  XLA_FLAGS take effect. Called inside another traced program (jax accepts compiler options
  only on the outermost jit), it is a plain jax.jit and the outer program's options apply."""

  def __init__(self, fun, jit_kwargs):
    functools.update_wrapper(self, fun)
    self._fun, self._jit_kwargs, self._jitted, self._nested = fun, jit_kwargs, None, None

  def _get(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=platform_options(), **self._jit_kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      if self._nested is None:
        self._nested = jax.jit(self._fun, **self._jit_kwargs)
      return self._nested(*args, **kwargs)
    return self._get()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._get().lower(*args, **kwargs)


def jit(fun=None, **jit_kwargs):
  """jax.jit with ctxjax's platform options; `jit(f, static_argnums=0)` or, as a decorator,
  `@jit` / `@functools.partial(jit, static_argnums=0)`."""
  if fun is None:
    return functools.partial(jit, **jit_kwargs)
  return _Jitted(fun, jit_kwargs)
