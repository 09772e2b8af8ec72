"""Perplexity vs length: protocols against a direct forward pass; per-source split."""
import jax
import numpy as np
import pytest

from ctxjax.eval import perplexity
from ctxjax.model.config import model_config_from_dict
from ctxjax.model.transformer import Transformer

BOS = 2


@pytest.fixture(scope="module")
def model_and_vars():
  cfg = model_config_from_dict(dict(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128))
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
  return model, variables, perplexity.nll_fn_from_model(model, variables)


def _docs(seed, sizes):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, 64, size=n).astype(np.int32) for n in sizes]


def test_nonoverlap_equals_direct_forward(model_and_vars):
  model, variables, nll_fn = model_and_vars
  docs = _docs(0, [20, 7, 30])
  L = 16
  res = perplexity.perplexity_vs_length(nll_fn, {"code": docs}, [L], bos_id=BOS, batch_size=2)
  stream = perplexity.source_stream(docs, BOS)
  n = (len(stream) - 1) // L
  x = np.stack([stream[i * L:(i + 1) * L] for i in range(n)])
  y = np.stack([stream[i * L + 1:(i + 1) * L + 1] for i in range(n)])
  logp = jax.nn.log_softmax(np.asarray(model.apply(variables, x), np.float64), axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), y[..., None], axis=-1)[..., 0]
  mask = y != BOS
  entry = res["per_source"]["code"][str(L)]
  assert entry["tokens"] == int(mask.sum())
  assert entry["ppl"] == pytest.approx(np.exp(nll[mask].mean()), rel=1e-5)
  assert res["overall"][str(L)]["ppl"] == pytest.approx(entry["ppl"])


def test_sliding_with_stride_length_equals_nonoverlap(model_and_vars):
  nll_fn = model_and_vars[2]
  docs = {"code": _docs(1, [40, 25])}
  a = perplexity.perplexity_vs_length(nll_fn, docs, [16], bos_id=BOS, batch_size=2)
  b = perplexity.perplexity_vs_length(nll_fn, docs, [16], bos_id=BOS, batch_size=2,
                                      protocol="sliding", stride=16)
  assert a["per_source"] == b["per_source"] and a["overall"] == b["overall"]
  half = perplexity.perplexity_vs_length(nll_fn, docs, [16], bos_id=BOS, batch_size=2,
                                         protocol="sliding")  # stride L/2: more windows
  assert half["per_source"]["code"]["16"]["tokens"] >= a["per_source"]["code"]["16"]["tokens"]


def test_sliding_windows_score_each_target_once():
  spans = perplexity.windows(20, 8, 4)
  scored = [s + f for s, f in spans]
  assert spans[0] == (0, 0) and all(f == 4 for _, f in spans[1:])
  covered = sorted(t for (s, f) in spans for t in range(s + f, s + 8))
  assert covered == list(range(len(covered)))  # contiguous, no target twice
  assert scored[0] == 0


def test_per_source_split(model_and_vars):
  nll_fn = model_and_vars[2]
  docs = {"code": _docs(2, [30]), "legal": _docs(3, [50]), "docs": _docs(4, [5])}
  res = perplexity.perplexity_vs_length(nll_fn, docs, [16], bos_id=BOS, batch_size=2)
  per = res["per_source"]
  assert set(per) == {"code", "legal", "docs"}
  assert per["docs"]["16"] == {"nll": None, "ppl": None, "tokens": 0}  # shorter than L
  alone = perplexity.perplexity_vs_length(nll_fn, {"legal": docs["legal"]}, [16], bos_id=BOS,
                                          batch_size=2)
  assert per["legal"]["16"] == alone["per_source"]["legal"]["16"]
  total = per["code"]["16"]["tokens"] + per["legal"]["16"]["tokens"]
  assert res["overall"]["16"]["tokens"] == total
  want = (per["code"]["16"]["nll"] * per["code"]["16"]["tokens"]
          + per["legal"]["16"]["nll"] * per["legal"]["16"]["tokens"]) / total
  assert res["overall"]["16"]["nll"] == pytest.approx(want)


def test_logits_fn_and_model_agree(model_and_vars):
  model, variables, nll_fn = model_and_vars
  from_logits = perplexity.nll_fn_from_logits(lambda t, p: model.apply(variables, t, p))
  rng = np.random.default_rng(5)
  t = rng.integers(4, 64, size=(2, 16)).astype(np.int32)
  y = rng.integers(4, 64, size=(2, 16)).astype(np.int32)
  p = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  m = np.ones((2, 16), np.float32)
  np.testing.assert_allclose(from_logits(t, p, y, m), nll_fn(t, p, y, m), rtol=1e-6)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "dynamic", "factor": 2.0}])
def test_packed_windows_equal_separate_windows(model_and_vars, rope_scaling):
  """pack_to: every length's windows side by side in rows of one width (separate segments,
  positions restarting) score exactly what separate windows score; dynamic NTK included
  (it reads max(position) + 1, which packing keeps)."""
  model, variables, _ = model_and_vars
  cfg = model_config_from_dict(dict(model.cfg.to_dict(), rope_scaling=rope_scaling,
                                    max_position_embeddings=8 if rope_scaling else 128))
  nll_fn = perplexity.nll_fn_from_model(Transformer(cfg), variables)
  docs = {"a": _docs(1, [40, 25, 60]), "b": _docs(2, [90])}
  kw = dict(bos_id=BOS, batch_tokens=64, max_tokens=100)
  alone = perplexity.perplexity_vs_length(nll_fn, docs, [8, 16, 32], **kw)
  packed = perplexity.perplexity_vs_length(nll_fn, docs, [8, 16, 32], pack_to=64, **kw)
  for src in docs:
    for L in ("8", "16", "32"):
      a, p = alone["per_source"][src][L], packed["per_source"][src][L]
      assert p["tokens"] == a["tokens"] > 0
      assert p["nll"] == pytest.approx(a["nll"], rel=1e-5)
  # the segments matter: one segment per packed row lets windows see each other
  one_segment = lambda t, p, y, m, s: nll_fn(t, p, y, m, np.ones_like(s))
  leaky = perplexity.perplexity_vs_length(one_segment, docs, [8], pack_to=64, **kw)
  assert leaky["overall"]["8"]["nll"] != pytest.approx(alone["overall"]["8"]["nll"], rel=1e-5)
