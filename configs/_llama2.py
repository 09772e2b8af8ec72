"""Shared pieces of the LLaMA-2 recipes (not a recipe itself: the leading underscore keeps it
out of the config list). Model dims are the Hugging Face `meta-llama/Llama-2-{7,13}b-hf`
config.json values; key names are Hugging Face's."""
import ml_collections

DIMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
}


def model(size: str, *, max_position_embeddings: int, rope_theta: float, attention_impl: str,
          remat_policy: str = "full"):
  """LLaMA-2 `size` ("7b" | "13b") at a new context: bf16 compute, fp32 master weights, scanned
  layers, remat (each layer's input is all a layer keeps for the backward pass)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=32000, head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
      initializer_range=0.02, **DIMS[size],
      max_position_embeddings=max_position_embeddings,
      position_embedding_type="rope", rope_theta=rope_theta, rope_scaling=None,
      attention_impl=attention_impl, attention_pattern=dict(kind="causal"),
      attention_mode="standard", attention_options={},
      dtype="bfloat16",              # explicit: "auto" would mean float32 on the compiling host
      param_dtype="float32",         # fp32 master weights and AdamW moments
      scan_layers=True,              # one compiled layer: compile time independent of depth
      remat_policy=remat_policy,
  ))


def mesh(**sizes):
  """ici/dcn sizes per mesh axis (ctxjax/train/sharding.py); unnamed axes are 1."""
  out = dict(ici_data=1, ici_fsdp=1, ici_context=1, ici_tensor=1,
             dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
  out.update(sizes)
  return ml_collections.ConfigDict(out)
