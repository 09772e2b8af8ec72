"""`import ctxjax` refuses a jax older than the code needs, in one line that says the fix."""
import importlib
from importlib import metadata

import pytest

import ctxjax


@pytest.fixture
def jax_version(monkeypatch):
  """Set the jax version the import-time check reads; re-import ctxjax with the real one after."""
  real = metadata.version

  def fake(version):
    monkeypatch.setattr(metadata, "version",
                        lambda name: version if name == "jax" else real(name))
  yield fake
  monkeypatch.setattr(metadata, "version", real)
  importlib.reload(ctxjax)


@pytest.mark.parametrize("old", ["0.8.1", "0.7.1", "0.4.38", "0.8.1rc1"])
def test_old_jax_is_refused_at_import_with_the_fix(jax_version, old):
  jax_version(old)
  with pytest.raises(ImportError) as err:
    importlib.reload(ctxjax)
  message = str(err.value)
  assert "\n" not in message
  assert f"jax {old} is installed" in message
  assert "jax>=0.8.2" in message
  assert 'pip install -U "jax>=0.8.2"' in message


@pytest.mark.parametrize("new", ["0.8.2", "0.10.2", "0.10.3.dev20270101", "1.0.0"])
def test_new_enough_jax_imports(jax_version, new):
  jax_version(new)
  importlib.reload(ctxjax)


def test_missing_jax_is_named(jax_version, monkeypatch):
  def missing(name):
    raise metadata.PackageNotFoundError(name)
  monkeypatch.setattr(metadata, "version", missing)
  with pytest.raises(ImportError, match='not installed: pip install -U "jax>=0.8.2"'):
    importlib.reload(ctxjax)


def test_the_bound_matches_pyproject():
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml")) as f:
    text = f.read()
  need = ".".join(map(str, ctxjax.JAX_MIN))
  assert f'"jax>={need}"' in text
  assert 'requires-python = ">=3.11"' in text
