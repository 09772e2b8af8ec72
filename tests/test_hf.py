"""Hugging Face interop (ctxjax.hf, import_hf, export_hf) against transformers 5.23.

Tiny random LlamaForCausalLMs are made here, saved with save_pretrained, loaded with
ctxjax.hf.load; logits on inputs longer than original_max_position_embeddings must match
transformers within 1e-4 for every rope type. Weights use std 0.2 and random norm scales, so
logits are O(10) and a wrong mapping or rope is far outside the tolerance.
"""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from ctxjax import hf  # noqa: E402
from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
ROOT = pathlib.Path(__file__).resolve().parents[1]
ORIG = 64  # original_max_position_embeddings
LONG = 200  # > ORIG: the scaled regime
TOL = 1e-4
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)  # GQA (2 query heads per kv head)
ROPES = {
    "default": None,
    "rope_theta": None,  # plain RoPE with a changed base (ABF)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
                 "original_max_position_embeddings": ORIG},
}
EXPORT_ROPES = {**ROPES, "ntk": {"rope_type": "ntk", "factor": 4.0}}  # ctxjax-only type
MAX_ABS_ERR = {}  # filled by the parity tests, printed at the end (pytest -s)


def _theta(name):
  return 5e5 if name == "rope_theta" else 1e4


def _randomize_norms(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)


def _hf_model(path, rope=None, *, theta=1e4, max_pos=4 * ORIG, dtype=torch.float32,
              cls="llama", **overrides):
  """A random tiny HF model saved to `path`; returns the torch model."""
  torch.manual_seed(0)
  rp = dict(rope or {"rope_type": "default"}, rope_theta=theta)
  kw = dict(SIZES, max_position_embeddings=max_pos, rope_parameters=rp, initializer_range=0.2,
            attn_implementation="eager", **overrides)
  if cls == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  _randomize_norms(model)
  model = model.eval().to(dtype)
  model.save_pretrained(path)
  return model


def _tokens(batch, length, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


def _jax_logits(model, variables, tokens):
  return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens, jnp.int32)), np.float32)


def _tensors(path):
  """{name: numpy array} of every tensor of a HF directory (all shards)."""
  out = {}
  for f in sorted(pathlib.Path(path).glob("*.safetensors")):
    with safe_open(str(f), framework="np") as h:
      out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


def _assert_same_tensors(a, b):
  ta, tb = _tensors(a), _tensors(b)
  assert sorted(ta) == sorted(tb)
  for k in ta:
    assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
    assert ta[k].tobytes() == tb[k].tobytes(), f"{k} differs"


def _rewrite_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  for k, v in changes.items():
    if v is ...:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def saved_fp32(tmp_path_factory):
  """One saved default-rope model for the error tests (read-only: copy before editing)."""
  path = tmp_path_factory.mktemp("hf") / "fp32"
  _hf_model(path)
  return path


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


# --- parity: HF -> ctxjax logits


@pytest.mark.parametrize("name", list(ROPES))
def test_logits_match_transformers(tmp_path, name):
  rope = ROPES[name]
  # dynamic NTK reads max_position_embeddings as the original length (emozilla 2023, as HF 5.23).
  max_pos = ORIG if name == "dynamic" else 4 * ORIG
  torch_model = _hf_model(tmp_path / "hf", rope, theta=_theta(name), max_pos=max_pos)
  model, variables = hf.load(tmp_path / "hf")
  assert model.cfg.rope_theta == _theta(name) and model.cfg.num_key_value_heads == 2
  lengths = (LONG, ORIG // 2) if name in ("dynamic", "longrope") else (LONG,)  # + short regime
  for length in lengths:
    tokens = _tokens(2, length)
    ref = _torch_logits(torch_model, tokens)
    err = float(np.abs(_jax_logits(model, variables, tokens) - ref).max())
    MAX_ABS_ERR[f"{name}@{length}"] = err
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    assert err < TOL, (name, length, err)


def test_long_context_parity(tmp_path):
  """At 32x the original length a 1-ulp inv_freq difference would already exceed 1e-4."""
  sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=16)
  rope = ROPES["yarn"]
  torch_model = _hf_model(tmp_path / "hf", dict(rope, factor=32.0), max_pos=32 * ORIG, **sizes)
  model, variables = hf.load(tmp_path / "hf")
  tokens = _tokens(1, 32 * ORIG)
  err = float(np.abs(_jax_logits(model, variables, tokens) - _torch_logits(torch_model, tokens))
              .max())
  MAX_ABS_ERR[f"yarn(f=32)@{32 * ORIG}"] = err
  assert err < TOL


def test_tied_mha_head_dim_unrolled(tmp_path):
  """Tied embeddings (no lm_head tensor), MHA (num_key_value_heads absent), head_dim !=
  hidden/heads, and the unrolled (scan_layers=False) layout."""
  torch_model = _hf_model(tmp_path / "hf", ROPES["linear"], tie_word_embeddings=True,
                          num_key_value_heads=None, head_dim=32)
  assert "lm_head.weight" not in _tensors(tmp_path / "hf")
  _rewrite_config(tmp_path / "hf", num_key_value_heads=..., head_dim=32)
  model, variables = hf.load(tmp_path / "hf", scan_layers=False)
  cfg = model.cfg
  assert cfg.tie_word_embeddings and cfg.num_key_value_heads == 4 and cfg.head_dim == 32
  assert "lm_head" not in variables["params"] and "layers_1" in variables["params"]
  tokens = _tokens(2, LONG)
  err = float(np.abs(_jax_logits(model, variables, tokens) - _torch_logits(torch_model, tokens))
              .max())
  MAX_ABS_ERR["tied+mha+head_dim32+unrolled@200"] = err
  assert err < TOL


def test_mistral_without_sliding_window(tmp_path):
  torch_model = _hf_model(tmp_path / "hf", cls="mistral", sliding_window=None)
  model, variables = hf.load(tmp_path / "hf")
  tokens = _tokens(1, LONG)
  err = float(np.abs(_jax_logits(model, variables, tokens) - _torch_logits(torch_model, tokens))
              .max())
  MAX_ABS_ERR["mistral@200"] = err
  assert err < TOL
  _rewrite_config(tmp_path / "hf", sliding_window=4096)
  with pytest.raises(ValueError, match="sliding_window"):
    hf.load(tmp_path / "hf")


# --- config spellings


@pytest.mark.parametrize("name", ["rope_theta", "linear", "yarn", "llama3", "longrope"])
def test_both_rope_spellings(tmp_path, name):
  """transformers < 5 (top-level rope_theta + rope_scaling with "type") and >= 5
  (rope_parameters) give the same ctxjax config, and transformers 5.23 agrees."""
  rope = ROPES[name]
  new = {**SIZES, "model_type": "llama", "max_position_embeddings": 4 * ORIG,
         "rope_parameters": dict(rope or {"rope_type": "default"}, rope_theta=_theta(name))}
  old = {**SIZES, "model_type": "llama", "max_position_embeddings": 4 * ORIG,
         "rope_theta": _theta(name)}
  if rope is not None:
    legacy = {k: v for k, v in rope.items() if k != "rope_type"}
    old["rope_scaling"] = dict(legacy, type=rope["rope_type"])
  ours = hf.config_from_hf(new)
  assert hf.config_from_hf(old) == ours
  # What transformers itself makes of the legacy file, re-read, is the same config too.
  seen = transformers.LlamaConfig.from_dict(dict(old)).to_dict()
  assert hf.config_from_hf(seen) == ours
  # Both dicts present and identical (what hf_config_from writes) is fine; disagreeing is not.
  both = dict(new, rope_theta=_theta(name), rope_scaling=new["rope_parameters"])
  assert hf.config_from_hf(both) == ours
  if rope is not None:
    bad = dict(both, rope_scaling=dict(new["rope_parameters"], rope_theta=123.0))
    with pytest.raises(ValueError, match="rope_parameters"):
      hf.config_from_hf(bad)


@pytest.mark.parametrize("name", ["default", "rope_theta", "linear", "dynamic", "yarn", "llama3",
                                  "longrope"])
def test_config_round_trip(name):
  cfg = model_config_from_dict(dict(
      SIZES, head_dim=16, max_position_embeddings=ORIG if name == "dynamic" else 4 * ORIG,
      rope_theta=_theta(name), rope_scaling=ROPES[name], dtype="bfloat16",
      param_dtype="bfloat16", attention_impl="auto"))  # an import's kernel: HF has no such key
  out = hf.hf_config_from(cfg)
  assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
  assert out["torch_dtype"] == out["dtype"] == "bfloat16"
  assert out["rope_theta"] == out["rope_parameters"]["rope_theta"] == _theta(name)
  if ROPES[name] is None:
    assert out["rope_scaling"] is None
  else:
    assert out["rope_scaling"] == out["rope_parameters"]
  if name in ("yarn", "llama3", "longrope"):
    assert out["original_max_position_embeddings"] == ORIG
  back = model_config_from_dict(hf.config_from_hf(out))
  assert back == cfg
  # transformers reads the same rope dict we wrote.
  seen = transformers.LlamaConfig.from_dict(dict(out))
  assert seen.rope_parameters["rope_type"] == (ROPES[name] or {"rope_type": "default"})[
      "rope_type"]
  assert seen.rope_parameters["rope_theta"] == _theta(name)


# --- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_import_export_import_bit_exact(tmp_path, dtype):
  _hf_model(tmp_path / "hf", ROPES["yarn"], dtype=getattr(torch, dtype))
  placed = []

  def place(name, x):
    placed.append((name, x.shape, x.dtype))
    return jnp.asarray(x)

  model, variables = hf.load(tmp_path / "hf", place=place)
  assert model.cfg.param_dtype == dtype  # the checkpoint's dtype is kept
  leaves = jax.tree_util.tree_leaves(variables["params"])
  assert {str(x.dtype) for x in leaves} == {dtype}
  assert len(placed) == len(leaves) == 12  # one call per (layer-stacked) parameter
  assert ("layers/layer/self_attn/q_proj/kernel", (2, 64, 4, 16), np.dtype(dtype)) in [
      (n, s, np.dtype(d)) for n, s, d in placed]
  # Sharded on export (tiny shards), then read back: every tensor bit-exact, same names.
  hf.save(model, variables, tmp_path / "out", max_shard_bytes=40_000)
  assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
  _assert_same_tensors(tmp_path / "hf", tmp_path / "out")
  model2, variables2 = hf.load(tmp_path / "out")
  assert model2.cfg == model.cfg
  for a, b in zip(leaves, jax.tree_util.tree_leaves(variables2["params"])):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # The unrolled layout writes the same bytes.
  model3, variables3 = hf.load(tmp_path / "out", scan_layers=False)
  hf.save(model3, variables3, tmp_path / "out3")
  _assert_same_tensors(tmp_path / "hf", tmp_path / "out3")
  if dtype != "float32":  # explicit upcast: exact float32 values of the stored weights
    model4, variables4 = hf.load(tmp_path / "hf", param_dtype="float32")
    assert model4.cfg.param_dtype == "float32"
    emb = np.asarray(variables4["params"]["embed_tokens"]["embedding"])
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(
        emb, _tensors(tmp_path / "hf")["model.embed_tokens.weight"].astype(np.float32))


def _ctxjax_model(rope_name, **overrides):
  """A ctxjax model with random params in its own layout (std 0.2 kernels, random norm
  scales), drawn with numpy from the abstract init: no init compile."""
  cfg = model_config_from_dict(dict(
      SIZES, head_dim=16, max_position_embeddings=4 * ORIG, rope_theta=_theta(rope_name),
      rope_scaling=EXPORT_ROPES[rope_name], **overrides))
  model = Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(0)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract["params"]))
  return model, {"params": params}


@pytest.mark.parametrize("rope_name", ["rope_theta", "yarn", "llama3", "ntk"])
def test_export_loads_in_transformers(tmp_path, rope_name):
  # HF 5.23 has no "ntk": it is exported as plain RoPE with base b*f^(d/(d-2)).
  model, variables = _ctxjax_model(rope_name, tie_word_embeddings=rope_name == "llama3")
  spm = tmp_path / "spm.model"
  spm.write_bytes(b"not really a sentencepiece model")
  hf.save(model, variables, tmp_path / "out", tokenizer_model=spm, max_shard_bytes=60_000)
  out = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == spm.read_bytes()
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  if rope_name == "ntk":
    assert out["rope_scaling"] is None and out["rope_theta"] == pytest.approx(1e4 * 4 ** (16 / 14))
  torch_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  assert torch_model.dtype == torch.float32
  tokens = _tokens(2, LONG)
  err = float(np.abs(_jax_logits(model, variables, tokens) - _torch_logits(torch_model, tokens))
              .max())
  MAX_ABS_ERR[f"export:{rope_name}@{LONG}"] = err
  assert err < TOL
  gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert gen["bos_token_id"] == hf.DEFAULT_TOKEN_IDS["bos_token_id"]


# --- errors


def test_error_model_type(tmp_path, saved_fp32):
  path = _copy(saved_fp32, tmp_path / "m")
  _rewrite_config(path, model_type="qwen2")
  with pytest.raises(ValueError, match="qwen2"):
    hf.load(path)


def test_error_missing_shard(tmp_path, saved_fp32):
  model, variables = hf.load(saved_fp32)
  hf.save(model, variables, tmp_path / "sharded", max_shard_bytes=40_000)
  shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    hf.load(tmp_path / "sharded")


def test_error_shape_and_dtype_mismatch(tmp_path, saved_fp32):
  path = _copy(saved_fp32, tmp_path / "m")
  _rewrite_config(path, intermediate_size=96)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
    hf.load(path)
  path = _copy(saved_fp32, tmp_path / "d")
  _rewrite_config(path, dtype="bfloat16")
  with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*dtype float32"):
    hf.load(path)


def test_error_missing_and_unused_tensors(tmp_path, saved_fp32):
  from safetensors.numpy import save_file
  tensors = _tensors(saved_fp32)
  path = _copy(saved_fp32, tmp_path / "m")
  save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"},
            str(path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['lm_head\.weight'\]"):
    hf.load(path)
  save_file(dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
            str(path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"q_proj\.bias"):
    hf.load(path)


def test_error_unknown_rope_type(tmp_path, saved_fp32):
  path = _copy(saved_fp32, tmp_path / "m")
  _rewrite_config(path, rope_parameters={"rope_type": "proportional", "rope_theta": 1e4})
  with pytest.raises(ValueError, match="proportional"):
    hf.load(path)
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    hf.config_from_hf(dict(SIZES, model_type="llama", partial_rotary_factor=0.5))


def test_error_non_empty_out_dir_and_atomic_overwrite(tmp_path, saved_fp32):
  model, variables = hf.load(saved_fp32)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  for overwrite in (False, True):  # only a previous export is ever replaced
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
      hf.save(model, variables, out, overwrite=overwrite)
  assert sorted(os.listdir(out)) == ["keep.txt"]
  (out / "keep.txt").unlink()
  hf.save(model, variables, out)
  (out / "tokenizer.model").write_text("stale")
  with pytest.raises(FileExistsError, match="holds a Hugging Face export; pass overwrite"):
    hf.save(model, variables, out)
  hf.save(model, variables, out, overwrite=True)
  assert "tokenizer.model" not in os.listdir(out) and (out / "model.safetensors").exists()
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dirs left behind
  with pytest.raises(ValueError, match="variables do not match"):
    hf.save(model, {"params": {"embed_tokens": variables["params"]["embed_tokens"]}},
            tmp_path / "bad")
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_write_leaves_nothing(tmp_path, saved_fp32, monkeypatch):
  import safetensors.numpy
  model, variables = hf.load(saved_fp32)
  hf.save(model, variables, tmp_path / "out")
  before = _tensors(tmp_path / "out")
  real, calls = safetensors.numpy.save_file, []

  def flaky(*args, **kwargs):  # the second shard fails (disk full, preemption, ...)
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(*args, **kwargs)

  monkeypatch.setattr(safetensors.numpy, "save_file", flaky)
  for target, overwrite in ((tmp_path / "new", False), (tmp_path / "out", True)):
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
      hf.save(model, variables, target, overwrite=overwrite, max_shard_bytes=40_000)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial directory, no temp dirs
  after = _tensors(tmp_path / "out")  # the old export is untouched
  assert all(before[k].tobytes() == after[k].tobytes() for k in before)


@pytest.mark.parametrize("overrides,match", [
    (dict(position_embedding_type="alibi"), "alibi"),
    (dict(position_embedding_type="xpos"), "xpos"),
    (dict(position_embedding_type="sinusoidal"), "sinusoidal"),
    (dict(attention_pattern={"kind": "sliding_window", "window": 16}), "sliding_window"),
    (dict(attention_mode="lm_infinite", attention_options={"n_global": 4, "n_local": 32}),
     "lm_infinite"),
])
def test_error_export_unexpressible(tmp_path, overrides, match):
  if "attention_mode" in overrides and not hasattr(model_config_from_dict({}), "attention_mode"):
    pytest.skip("this checkout has no attention modes")
  cfg = model_config_from_dict(dict(SIZES, head_dim=16, **overrides))
  with pytest.raises(ValueError, match=match):
    hf.hf_config_from(cfg)
  with pytest.raises(ValueError, match=match):
    hf.save(Transformer(cfg), {"params": {}}, tmp_path / "out")
  assert not (tmp_path / "out").exists()


# --- command lines


def _run(*args, returncode=0):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == returncode, proc.stdout + proc.stderr
  return proc.stdout


def test_cli_import_export(tmp_path):
  _hf_model(tmp_path / "hf", ROPES["llama3"], dtype=torch.bfloat16, bos_token_id=1,
            eos_token_id=2)
  # absl's --help prints the flags and exits with status 1.
  assert "--hf_dir" in _run("ctxjax.import_hf", "--help", returncode=1)
  assert "--overwrite" in _run("ctxjax.export_hf", "--help", returncode=1)
  out = _run("ctxjax.import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'wd'}")
  assert "imported" in out and "bfloat16" in out and "llama3" in out
  cfg = json.loads((tmp_path / "wd" / "model_config.json").read_text())
  assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["param_dtype"] == "bfloat16"
  out = _run("ctxjax.export_hf", f"--workdir={tmp_path / 'wd'}", f"--out={tmp_path / 'out'}",
             "--max_shard_bytes=40000")
  assert "exported" in out
  _assert_same_tensors(tmp_path / "hf", tmp_path / "out")
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["bos_token_id"] == 1 and exported["eos_token_id"] == 2


def test_zz_report_parity():
  """Prints the max abs logit error per case (run with -s to see it)."""
  for k, v in sorted(MAX_ABS_ERR.items()):
    print(f"max|logits - HF| {k:40s} {v:.3g}")
