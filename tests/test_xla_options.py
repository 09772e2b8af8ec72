"""The steps' XLA compiler options: on CPU, XLA's own dot emitter unless the user opts out."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train import xla_options
from ctxjax.train.step import init_state, make_train_step


def test_cpu_steps_turn_ynn_dot_fusions_off(monkeypatch):
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  options = xla_options.step_compiler_options()
  assert options == xla_options.CPU_OPTIONS
  lowered = jax.jit(lambda a: jnp.tanh(a @ a)).lower(jnp.ones((64, 64)))
  # XLA's default fuses this dot with YNNPACK; the option (and only it) removes that fusion.
  assert "ynn_fusion" in lowered.compile().as_text()
  assert "ynn_fusion" not in lowered.compile(compiler_options=options).as_text()


def test_user_choices_win(monkeypatch):
  monkeypatch.setenv("CTXJAX_XLA_DEFAULTS", "1")
  assert xla_options.step_compiler_options() is None
  monkeypatch.delenv("CTXJAX_XLA_DEFAULTS")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_options.step_compiler_options() is None


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
