# A 3.7M-parameter LLaMA (d 256, 4 layers, 4 heads of 64, vocab 1024) with RoPE, trained on the
# bundled demo corpus (Python stdlib code, Perl/vim docs, licences; built on first use).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny.py --workdir=runs/tiny
# HARDWARE:  2 CPU cores, ~2-3 minutes (the first run also builds the corpus and tokenizer, ~10 s).
# EXPECTED:  measured 2026-12-06 (2-core AMD EPYC, Zen 4): eval_loss 4.951 nats/token vs the
#            corpus unigram entropy 5.955 (perplexity 141 vs 386), median 5,021 tokens/s, 2 min
#            17 s (2026-11-22 on a slower 2-core EPYC: eval_loss 4.97, ~2.5K tokens/s).
# Override anything: --config.model.rope_theta=5e5 --config.data.seq_len=512 ...
import ml_collections


def get_model_config():
  return ml_collections.ConfigDict(dict(
      vocab_size=1024,
      hidden_size=256,
      intermediate_size=704,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=64,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      initializer_range=0.02,
      max_position_embeddings=2048,
      position_embedding_type="rope",
      rope_theta=10000.0,
      rope_scaling=None,
      xpos_scale_base=512.0,
      xpos_gamma=0.4,
      attention_impl="auto",         # blockwise on CPU, cuDNN on GPU, splash on TPU (docs/pods.md)
      attention_pattern=dict(kind="causal"),
      attention_mode="standard",     # standard | s2 | dilated | lm_infinite
      attention_options={},          # the mode's options (configs/tiny_attention.py)
      dtype="auto",                  # bfloat16 on GPU/TPU, float32 on CPU
      param_dtype="float32",
      scan_layers=False,             # unrolled: ~12% faster on XLA:CPU at this size; scan for big models
      remat_policy="none",
  ))


def get_config():
  config = ml_collections.ConfigDict()
  config.model = get_model_config()
  config.data = ml_collections.ConfigDict(dict(
      name="demo",
      data_dir="",                   # "" -> $CTXJAX_DATA_DIR or ~/.cache/ctxjax
      seq_len=256,
      batch_size=8,
      packed_positions="per_document",  # or "continuous"
      position_ids="data",           # "data" | "randomized" | "pose" (training-time generators)
      max_position_id=2048,          # the range randomized/PoSE ids are drawn from
  ))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
  ))
  # Mesh axes data/fsdp/context/tensor; -1 = all remaining devices (ctxjax/train/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(
      ici_data=-1, ici_fsdp=1, ici_context=1, ici_tensor=1,
      dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1,
  ))
  config.train = ml_collections.ConfigDict(dict(
      steps=300, log_every=10, eval_batches=8, seed=0,
      save_every=100, keep_checkpoints=2, async_checkpoints=True,  # 0 = no checkpoints
      grad_accum_steps=1,            # micro-batches per optimizer step (batch_size is global)
      init_from="",                  # a ctxjax workdir: start from its parameters only
      init_from_hf="",               # a Hugging Face LLaMA directory: start from its weights
  ))
  # In-training evaluation (ctxjax/eval/during_training.py, docs/evaluation.md): off at every=0.
  # E.g. --config.eval.every=100 scores perplexity and passkey retrieval at 256 and 512 tokens
  # every 100 steps into metrics.jsonl / TensorBoard as eval/ppl@256, eval/passkey@512, ...
  config.eval = ml_collections.ConfigDict(dict(
      every=0,                       # steps between evaluations (and after the last); 0 = off
      tasks=("ppl", "passkey"),      # any of ppl, passkey, needle, ruler
      lengths=(),                    # () = data.seq_len and twice it
      depths=(0.0, 0.5, 1.0),        # needle depths of the retrieval tasks
      samples=1,                     # prompts per (length, depth)
      max_tokens=4096,               # ppl: scored tokens per held-out source and length
  ))
  return config
