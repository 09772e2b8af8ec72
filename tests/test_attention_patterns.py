"""Patterns lambda (LM-Infinite), block_causal (xPos), attention_sinks (StreamingLLM): exact masks,
exact block_visible (exhaustive), linear visit counts, blockwise == reference (values + grads)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import blockwise as bw
from ctxjax.attention import make_pattern
from ctxjax.attention.patterns import AttentionSinks, BlockCausal, LambdaMask
from ctxjax.attention.reference import reference_attention
from ctxjax.model.config import model_config_from_dict
from attention_cases import packed as _packed

FP32_TOL = 1e-5


def _rows(pattern, n):
  pos = np.arange(n)
  vis = np.asarray(pattern.mask(pos[:, None], pos[None, :]))
  return ["".join("X" if x else "." for x in row) for row in vis]


def test_lambda_vector():
  """LM-Infinite's Lambda mask (Han et al. 2024) for n 10, local 3, global 2; L = local
  branch, G = global."""
  want = ["L.........", "LL........", "LLL.......", "GLLL......", "GGLLL.....", "GG.LLL....",
          "GG..LLL...", "GG...LLL..", "GG....LLL.", "GG.....LLL"]
  lam = _rows(make_pattern("lambda", n_global=2, n_local=3), 10)
  local = _rows(make_pattern("sliding_window", window=3), 10)
  got = ["".join("L" if l == "X" else ("G" if g == "X" else ".") for g, l in zip(gr, lr))
         for gr, lr in zip(lam, local)]
  assert got == want


def test_block_causal_mask():
  """Blocks of 3: causal inside the block, plus the whole previous block."""
  assert _rows(make_pattern("block_causal", block_size=3), 8) == [
      "X.......", "XX......", "XXX.....",
      "XXXX....", "XXXXX...", "XXXXXX..",
      "...XXXX.", "...XXXXX"]


def test_attention_sinks_mask():
  """2 sinks + a window of 3 (the query included); the same mask as lambda(2, 3)."""
  want = ["X.......", "XX......", "XXX.....", "XXXX....", "XXXXX...", "XX.XXX..",
          "XX..XXX.", "XX...XXX"]
  assert _rows(make_pattern("attention_sinks", sink_size=2, window=3), 8) == want
  assert _rows(make_pattern("lambda", n_global=2, n_local=3), 8) == want
  assert _rows(AttentionSinks(sink_size=0, window=3), 8) == _rows(
      make_pattern("sliding_window", window=3), 8)


SMALL = [LambdaMask(n_global=2, n_local=3), LambdaMask(n_global=0, n_local=1),
         LambdaMask(n_global=5, n_local=2), BlockCausal(block_size=1), BlockCausal(block_size=3),
         BlockCausal(block_size=4), AttentionSinks(sink_size=1, window=4),
         AttentionSinks(sink_size=4, window=2)]


@pytest.mark.parametrize("pattern", SMALL,
                         ids=lambda p: f"{p.kind}{tuple(p.to_dict().values())[1:]}")
def test_block_visible_is_exact(pattern):
  """For every pair of position ranges in [0, 13): block_visible == 'some pair is visible'.

  Never False where a visible pair exists (conservative, needed for correctness) and never
  True where none does (tight: that is what makes the cost linear)."""
  n = 13
  pos = np.arange(n)
  vis = np.asarray(pattern.mask(pos[:, None], pos[None, :])).astype(np.int64)
  cum = np.zeros((n + 1, n + 1), np.int64)
  cum[1:, 1:] = vis.cumsum(0).cumsum(1)
  lo, hi = np.triu_indices(n)  # all ranges [lo, hi]
  q_lo, k_lo = np.meshgrid(lo, lo, indexing="ij")
  q_hi, k_hi = np.meshgrid(hi, hi, indexing="ij")
  count = (cum[q_hi + 1, k_hi + 1] - cum[q_lo, k_hi + 1] - cum[q_hi + 1, k_lo]
           + cum[q_lo, k_lo])
  got = np.broadcast_to(np.asarray(pattern.block_visible(q_lo, q_hi, k_lo, k_hi)), count.shape)
  np.testing.assert_array_equal(got, count > 0)


@pytest.mark.parametrize("pattern,most", [(LambdaMask(n_global=4, n_local=8), 3),
                                           (BlockCausal(block_size=12), 4),
                                           (AttentionSinks(sink_size=4, window=20), 5)],
                         ids=["lambda", "block_causal", "attention_sinks"])
def test_visit_count_linear_in_length(pattern, most):
  """Every query block visits at most `most` key blocks, whatever the length (n blocks)."""
  blk, n_max = 8, 32
  pos = jnp.arange(n_max * blk, dtype=jnp.int32)[None]
  one = jnp.ones_like(pos)
  total = bw.count_visits(pos, pos, one, one, pattern=pattern, block_q=blk, block_k=blk)
  sched = np.asarray(bw.visit_schedule(pos, pos, one, one, pattern=pattern, block_q=blk,
                                       block_k=blk))
  assert sched.sum() == total
  for n in (4, 8, 16, 32):  # positions 0..n*blk-1: the schedule's leading n x n corner
    per_q_block = sched[:n, :n].sum(axis=1)
    assert per_q_block.max() <= most, (n, per_q_block)
    if isinstance(pattern, LambdaMask):  # diagonal + previous block + the global key block
      assert per_q_block.sum() == 3 * n - 3


B, T, D = 2, 64, 16


@pytest.mark.parametrize("pattern", [LambdaMask(n_global=3, n_local=10), BlockCausal(block_size=12),
                                     AttentionSinks(sink_size=4, window=9)],
                         ids=["lambda", "block_causal", "attention_sinks"])
def test_blockwise_matches_reference(pattern):
  rng = np.random.default_rng(0)
  q, do = (jnp.asarray(rng.standard_normal((B, T, 4, D), np.float32)) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, T, 2, D), np.float32)) for _ in range(2))

  @jax.jit
  def both(q, k, v, do, pos, seg):
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
              pattern=pattern)
    res = []
    for fn in (lambda q, k, v: reference_attention(q, k, v, **kw),
               lambda q, k, v: bw.blockwise_attention(q, k, v, block_q=16, block_k=8, **kw)):
      out, pull = jax.vjp(fn, q, k, v)
      res.append((out,) + pull(do))
    return res

  single = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), jnp.ones((B, T), jnp.int32))
  for pos, seg in (single, _packed(T)):
    ref, got = both(q, k, v, do, pos, seg)
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
      err = float(jnp.max(jnp.abs(r - g)))
      assert err <= FP32_TOL, f"{name}: {err:.3g}"
    assert float(jnp.abs(ref[0]).max()) > 0


def test_make_pattern_config_and_errors():
  p = make_pattern("lambda", n_global=4, n_local=16)
  assert p.to_dict() == {"kind": "lambda", "n_global": 4, "n_local": 16}
  assert make_pattern("attention_sinks").to_dict() == {"kind": "attention_sinks",
                                                       "sink_size": 4, "window": 512}
  cfg = model_config_from_dict({"attention_pattern": {"kind": "block_causal", "block_size": 32}})
  assert cfg.attention_pattern == BlockCausal(block_size=32)
  for kind, kw, match in (("lambda", dict(n_local=0), "n_local"),
                          ("lambda", dict(n_global=-1), "n_global"),
                          ("block_causal", dict(block_size=0), "block_size"),
                          ("attention_sinks", dict(window=0), "window"),
                          ("attention_sinks", dict(sink_size=-1), "sink_size"),
                          ("lambda", dict(window=3), "unknown keys")):
    with pytest.raises(ValueError, match=match):
      make_pattern(kind, **kw)
