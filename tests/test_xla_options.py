"""The steps' XLA compiler options: on CPU, XLA's own dot emitter unless the user opts out."""
import jax
import jax.numpy as jnp

from ctxjax.train import xla_options


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
