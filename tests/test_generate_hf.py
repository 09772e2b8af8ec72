"""Greedy generation equals transformers' `generate(do_sample=False)` token for token on tiny
random LLaMA checkpoints imported with ctxjax.hf.load, for every rope_type; each step's logits
match transformers' within 1e-4. Prompts and lengths cross each scaling's switch point during
decoding (dynamic NTK past max_position_embeddings, LongRoPE past the original length), where
a cache that re-rotated its keys would differ from transformers."""
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ctxjax import hf  # noqa: E402
from ctxjax.eval import generate  # noqa: E402
from ctxjax.model import kv_cache  # noqa: E402
from test_hf import ORIG, ROPES as HF_ROPES  # noqa: E402  (the parity tests' rope table)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
TOL = 1e-4
NEW = 12


def _hf_model(path, rope):
  torch.manual_seed(0)
  max_pos = ORIG if rope and rope["rope_type"] == "dynamic" else 4 * ORIG
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
      rope_parameters=dict(rope or {"rope_type": "default"}, rope_theta=1e4),
      initializer_range=0.2, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(path)
  return model


def _hf_generate(model, prompt):
  # A fresh copy per call: transformers' dynamic/longrope layers keep their last frequencies.
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompt.astype(np.int64)), do_sample=False,
                         max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         output_logits=True, return_dict_in_generate=True)
  return out.sequences.numpy(), np.stack([x.float().numpy() for x in out.logits], axis=1)


def _step_logits(model, variables, prompt, tokens):
  """ctxjax's logits for each generated position: prefill, then one cached step per token."""
  batch, plen = prompt.shape
  cache = kv_cache.init_cache(model.cfg, batch, plen + NEW)
  pos = np.broadcast_to(np.arange(plen, dtype=np.int32), prompt.shape)
  logits, cache = model.apply(variables, prompt, pos, np.ones_like(pos), cache=cache)
  out = [np.asarray(logits[:, -1])]
  step = jax.jit(lambda v, t, p, c: model.apply(v, t, p, np.ones((batch, 1), np.int32), cache=c))
  for i in range(NEW - 1):
    logits, cache = step(variables, tokens[:, plen + i:plen + i + 1],
                         np.full((batch, 1), plen + i, np.int32), cache)
    out.append(np.asarray(logits[:, 0]))
  return np.stack(out, axis=1)


ROPES = {k: v for k, v in HF_ROPES.items() if k != "rope_theta"}  # ABF = default here


@pytest.mark.parametrize("name", sorted(ROPES))
def test_greedy_tokens_and_logits_equal_transformers(tmp_path, name):
  torch_model = _hf_model(tmp_path / "hf", ROPES[name])
  model, variables = hf.load(tmp_path / "hf")
  # Cross the switch: dynamic NTK rescales past max_position_embeddings (= ORIG here), LongRoPE
  # switches to long factors past ORIG; the others are checked beyond ORIG too.
  plen = ORIG - 4
  prompt = np.random.default_rng(0).integers(0, 128, (2, plen)).astype(np.int32)
  ref_tokens, ref_logits = _hf_generate(torch_model, prompt)
  tokens = np.asarray(generate(model, variables, prompt, NEW))
  np.testing.assert_array_equal(tokens, ref_tokens)
  err = np.abs(_step_logits(model, variables, prompt, tokens) - ref_logits).max()
  assert np.abs(ref_logits).max() > 1.0 and err < TOL, (name, err)
