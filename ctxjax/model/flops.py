"""Parameter and FLOP counts for throughput / MFU reporting."""
from __future__ import annotations

from ctxjax.model.config import ModelConfig


def param_count(cfg: ModelConfig) -> dict:
  """Exact parameter counts of `Transformer(cfg)` (embedding, blocks, head)."""
  e, h, k, d, m = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.intermediate_size)
  per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * m + 2 * e
  embedding = cfg.vocab_size * e
  head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * e
  learned = cfg.max_position_embeddings * e if cfg.position_embedding_type == "learned" else 0
  blocks = cfg.num_hidden_layers * per_layer
  return {"embedding": embedding + learned, "blocks": blocks, "head": head, "final_norm": e,
          "total": embedding + learned + blocks + head + e}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (forward + backward), PaLM's convention (Chowdhery et al.
  2022, App. B): 6 * matmul parameters + 12 * layers * heads * head_dim * seq_len. The attention
  term counts the full score matrix (no causal discount), as MFU figures usually do; the
  embedding lookup is not a matmul and is excluded, the LM head is included."""
  counts = param_count(cfg)
  matmul_params = counts["blocks"] + (counts["head"] or cfg.vocab_size * cfg.hidden_size)
  attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attn
