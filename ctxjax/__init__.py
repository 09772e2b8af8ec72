"""ctxjax: context-length extension for LLaMA-family models in JAX/Flax.

Importing the package checks the installed jax first: an older jax fails later with an
AttributeError deep in a training step (jax.reshard appeared in jax 0.8.2,
jax.sharding.get_mesh in 0.8.1, jax.set_mesh in 0.7.1), so the check names the installed and
required versions and the fix up front instead.
"""
from importlib import metadata as _metadata

JAX_MIN = (0, 8, 2)  # the oldest jax with every jax.* name ctxjax uses (jax.reshard)


def _release(version: str) -> tuple[int, ...]:
  """(0, 10, 2) from '0.10.2', '0.10.2.dev20260101', '0.10.2rc1'."""
  parts = []
  for piece in version.split(".")[:3]:
    digits = ""
    for ch in piece:
      if not ch.isdigit():
        break
      digits += ch
    parts.append(int(digits or 0))
  return tuple(parts)


def check_jax_version() -> None:
  """Raise ImportError (one line: installed, required, fix) if the installed jax is too old."""
  need = ".".join(map(str, JAX_MIN))
  try:
    installed = _metadata.version("jax")
  except _metadata.PackageNotFoundError:
    raise ImportError(f'ctxjax needs jax>={need}, which is not installed: '
                      f'pip install -U "jax>={need}"') from None
  if _release(installed) < JAX_MIN:
    raise ImportError(f'ctxjax needs jax>={need} (jax.reshard, jax.set_mesh), but jax '
                      f'{installed} is installed: pip install -U "jax>={need}"')


check_jax_version()
