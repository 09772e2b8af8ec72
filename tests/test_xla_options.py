"""ctxjax's XLA compiler options: on CPU, XLA's own dot emitter (YNNPACK fusions off) for every
program ctxjax compiles, unless the user opts out."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxjax import xla_options
from ctxjax.eval import generation
from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train.step import init_state, make_train_step


def test_cpu_steps_turn_ynn_dot_fusions_off(monkeypatch):
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  options = xla_options.platform_options()
  assert options == xla_options.CPU_OPTIONS
  lowered = jax.jit(lambda a: jnp.tanh(a @ a)).lower(jnp.ones((64, 64)))
  # XLA's default fuses this dot with YNNPACK; the option (and only it) removes that fusion.
  assert "ynn_fusion" in lowered.compile().as_text()
  assert "ynn_fusion" not in lowered.compile(compiler_options=options).as_text()


def test_user_choices_win(monkeypatch):
  monkeypatch.setenv("CTXJAX_XLA_DEFAULTS", "1")
  assert xla_options.platform_options() is None
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_options.platform_options() is None


def test_the_train_step_compiles_with_the_options_it_is_given(monkeypatch, tiny_model_dict):
  """make_train_step: ctxjax's CPU options by default; `compiler_options` replaces them
  (None = XLA's defaults: YNNPACK dot fusions back; benchmarks/xla_options.py compares)."""
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  model = Transformer(model_config_from_dict(tiny_model_dict))
  tx = optax.adamw(1e-3)
  state, _ = init_state(model, tx, jax.random.PRNGKey(0), 2, 16)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 64
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)),
           "loss_mask": np.ones(tokens.shape, np.float32)}
  compiled = lambda **kw: make_train_step(model, tx, {}, **kw).lower(
      state, batch).compile().as_text()
  assert "ynn_fusion" not in compiled()
  assert "ynn_fusion" in compiled(compiler_options=None)


def test_jit_compiles_with_the_platform_options(monkeypatch):
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  f = lambda a: jnp.tanh(a @ a)
  x = jnp.ones((64, 64))
  assert "ynn_fusion" not in xla_options.jit(f).lower(x).compile().as_text()
  monkeypatch.setenv("CTXJAX_XLA_DEFAULTS", "1")  # read when a jit first compiles
  assert "ynn_fusion" in xla_options.jit(f).lower(x).compile().as_text()


def test_jit_resolves_the_options_at_the_first_call_and_keeps_jit_arguments(monkeypatch):
  """Creating a jit (a decorator at import) must not ask for the backend; jax.jit's own
  arguments (static_argnums here) pass through, in both decorator forms."""
  calls = []
  monkeypatch.setattr(xla_options, "platform_options",
                      lambda mesh=None: calls.append(1) or dict(xla_options.CPU_OPTIONS))

  @functools.partial(xla_options.jit, static_argnums=0)
  def power(n, x):
    return x ** n

  @xla_options.jit
  def double(x):
    return 2 * x

  assert calls == [] and power.__name__ == "power"
  assert float(power(3, jnp.float32(2.0))) == 8.0 and float(power(2, jnp.float32(3.0))) == 9.0
  assert float(double(jnp.float32(4.0))) == 8.0
  assert calls == [1, 1]  # once per jit, not per call or per static argument
  # inside another program: jax takes compiler options only on the outermost jit
  assert float(jax.jit(lambda x: power(2, x) + double(x))(jnp.float32(3.0))) == 15.0
  assert float(jax.grad(lambda x: power(3, x))(jnp.float32(2.0))) == 12.0


def test_jit_avoids_the_xla_cpu_miscompile_of_batched_dot_then_reduce(monkeypatch):
  """jax-ml/jax#39103: under XLA:CPU's YNNPACK fusions (jaxlib 0.10.2) this vmapped
  matrix-vector product followed by a sum returns row 32,640's value in the last row of
  32,769. ctxjax's programs compile without those fusions and get the exact values."""
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  n = 32_769
  rows = np.arange(n, dtype=np.float32)
  x = np.stack([rows, np.zeros_like(rows), np.zeros_like(rows)], axis=1)
  f = lambda x: jax.vmap(lambda r: jnp.sum((jnp.eye(3, dtype=x.dtype) @ r) ** 2))(x)
  np.testing.assert_array_equal(np.asarray(xla_options.jit(f)(x)), rows ** 2)  # exact: i^2 < 2^31


def test_generation_programs_compile_with_the_platform_options(monkeypatch, tiny_model_dict):
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  model = Transformer(model_config_from_dict(tiny_model_dict))
  prompt = jnp.arange(8, dtype=jnp.int32)[None] % 64
  variables = model.init(jax.random.PRNGKey(0), prompt, jnp.arange(8)[None], jnp.ones((1, 8)))
  program = generation.compiled(model, 1, 8, 4)
  variables = program.unroll(variables)  # a scan_layers model decodes unrolled
  lengths, key = jnp.array([8], jnp.int32), jax.random.PRNGKey(0)
  prefill = program.prefill.lower(variables, prompt, lengths, key).compile().as_text()
  state = program.prefill(variables, prompt, lengths, key)
  decode = program.decode.lower(variables, lengths, key, *state).compile().as_text()
  assert "ynn_fusion" not in prefill and "ynn_fusion" not in decode
