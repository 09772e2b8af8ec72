"""Memory and retrieval attention vs RoPE, RoPE + PI and ALiBi: passkey accuracy past the
training length (ctxjax issue #15's benchmark).

  nice -n 19 python benchmarks/memory.py [--arms=rope,rope_pi,...] [--steps=3000]
      [--demo_share=0.5] [--samples=10] [--depths=0,0.25,0.5,0.75,1] [--multiples=1,4,8,16]
      [--out=benchmarks/results/memory.json]

Recipe (from ctxjax/agent/passkey_model.py). Passkey prompts (Mohtashami & Jaggi 2023,
ctxjax/data/synthetic.py) under a phrase-level tokenizer of the passkey templates (each filler
sentence, the header, "The pass key is", ... one token; digits one token each) with printable
ASCII added as character tokens (118 ids), so a 64-token prompt holds ~44 filler sentences and
the needle (16 tokens). Every arm is the same 2-layer width-64 model (4 heads of 16), trained
with the same seeds on the same rows: 4096 rows `[bos] prompt(64 tokens) answer eos` at uniform
depths, mixed with demo-corpus text rows (`demo_rows`: random windows of
ctxjax/data/corpus.py's corpus, one token per character) making --demo_share of all rows;
AdamW 3e-3 warmup-cosine, batch 32, --steps steps, next-token loss on every real token.

Arms (ARMS, a Registry; one more method is one more ARMS.add):

  rope        plain RoPE, full causal attention, kv-cache decoding (ctxjax.eval.generate).
  rope_pi     the rope arm fine-tuned with linear position interpolation (Chen et al. 2023,
              positions / 4) on prompts of 4x the length: --steps // 3 steps at batch 8 (the
              same tokens per step), peak lr 1e-3.
  alibi       ALiBi (Press et al. 2022) instead of RoPE.
  landmark    landmark attention (Mohtashami & Jaggi 2023): a landmark id after every 15
              tokens of the same rows (blocks of 16 slots), grouped softmax in training, top-2
              blocks per head at inference (ctxjax.model.landmark_generate; true positions).
  memorizing  kNN memory in the last layer (Wu et al. 2022): windows of 16 tokens, a memory of
              the last 64 keys in training, 16 neighbours, gated.
  fot         Focused Transformer (Tworkowski et al. 2023): the same windows, the whole memory
              in one softmax with the local window, 3 cross-batch negatives in training.
  longmem     LongMem (Wang et al. 2023): the rope arm as frozen backbone (read in windows of
              16), a fresh 2-layer side network trained alone, its last layer reading the
              backbone's last-layer keys/values of earlier windows (16 neighbours).

landmark, memorizing and fot train from scratch like rope. The papers fine-tune a pretrained
model instead (LLaMA 7B for landmarks, OpenLLaMA for LongLLaMA/FoT; Wu et al. 2022 also add
memory to a pretrained model by fine-tuning), so `landmark_ft`, `memorizing_ft` and `fot_ft`
start from the rope arm's parameters and train all of them for another --steps steps. Their new
parameters start fresh: the landmark id's rows, the memory gates. They are not in the default
run: --arms=rope,landmark_ft,memorizing_ft,fot_ft (docs/memory.md has the measured run of all).

The memory arms read a prompt window by window (ctxjax.model.memory_inference) with a memory
enlarged at evaluation to hold the whole prompt (memory_size is not a parameter).

Evaluation: ctxjax/eval/retrieval.py `retrieval_grid` (greedy, exact passkey match) at
--multiples of 64 tokens, --depths x --samples prompts per length. Per arm and length:
  passkey_accuracy   mean over the prompts (their count: prompts_per_length)
  state_bytes        per prompt row, float32: what the method keeps while decoding - the kv
                     cache of every layer (rope, rope_pi, alibi); the kNN memory of the memory
                     layer plus one window's kv of every layer (memorizing, fot, longmem); the
                     kv of every slot, landmarks included (landmark: what landmark_generate's
                     cache holds)
  program_bytes      XLA memory_analysis (temp + argument bytes) of the compiled program that
                     reads the prompt, batch 1: the kv-cache prefill (rope family), the forward
                     over all slots (landmark), one window against the full memory (memory arms)
  tokens_per_sec     prompt tokens of the grid / its wall seconds, decoding of the answer
                     included, compiles excluded (one batch of the same shape runs first);
                     on a shared machine it moves with the load (and a paused process)
plus per arm train_sec and final_train_loss, and the machine's load average. Results are
written to --out after every arm.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import string
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)

from ctxjax.registry import Registry  # noqa: E402

TRAIN_LENGTH = 64  # prompt tokens of the training rows
WINDOW = 16        # memory window of the memory arms; landmark blocks of 15 tokens + landmark
MAX_NEW = 8        # retrieval.MAX_NEW_TOKENS["passkey"]
POOL = 4096        # training rows per arm (the same rows for every arm at 1x)
BATCH = 32


@dataclasses.dataclass(frozen=True)
class Arm:
  about: str
  model: dict = dataclasses.field(default_factory=dict)  # passkey_model.MODEL overrides
  base: str | None = None          # the arm whose trained parameters this one starts from
  trainable: tuple[str, ...] = ()  # regexes of the parameters that train (() = all)
  length_factor: int = 1           # training prompt length / TRAIN_LENGTH
  step_divisor: int = 1            # steps = --steps // step_divisor
  peak_lr: float = 3e-3
  landmark: bool = False           # landmark ids inserted into the rows


MEMORY = dict(memory_window=WINDOW, memory_size=4 * WINDOW, memory_layers=[-1],
              memory_neighbors=0, memory_cross_batch=0)
ARMS: Registry[Arm] = Registry("--arms")
ARMS.add("rope", Arm("plain RoPE"))
ARMS.add("rope_pi", Arm("rope + linear PI x4, fine-tuned at 4x",
                        dict(rope_scaling=dict(rope_type="linear", factor=4.0),
                             max_position_embeddings=4 * 128),
                        base="rope", length_factor=4, step_divisor=3, peak_lr=1e-3))
ARMS.add("alibi", Arm("ALiBi", dict(position_embedding_type="alibi")))
LANDMARK = dict(attention_mode="landmark", attention_impl="blockwise")
MEMORIZING = {**MEMORY, "memory_kind": "memorizing", "memory_neighbors": 16}
FOT = {**MEMORY, "memory_kind": "fot", "memory_cross_batch": 3}
ARMS.add("landmark", Arm("landmark attention, top-2 blocks", LANDMARK, landmark=True))
ARMS.add("memorizing", Arm("kNN memory (last layer), 16 neighbours", MEMORIZING))
ARMS.add("fot", Arm("Focused Transformer memory (last layer), 3 negatives", FOT))
ARMS.add("longmem", Arm("LongMem side network on the frozen rope arm",
                        {**MEMORY, "memory_kind": "longmem", "memory_neighbors": 16,
                         "side_layers": 2, "side_memory_layer": -1},
                        base="rope", trainable=("^side_",)))
DEFAULT_ARMS = list(ARMS)  # insertion order: every base before the arms that start from it
# The same three methods fine-tuned from the rope arm (module doc): not in the default run.
ARMS.add("landmark_ft", Arm("landmark attention, fine-tuned from rope", LANDMARK, base="rope",
                            landmark=True))
ARMS.add("memorizing_ft", Arm("kNN memory, fine-tuned from rope", MEMORIZING, base="rope"))
ARMS.add("fot_ft", Arm("Focused Transformer memory, fine-tuned from rope", FOT, base="rope"))


def model_overrides(arm: Arm, vocab_size: int) -> dict:
  """The arm's config keys over passkey_model.MODEL (landmark: its id is the last one)."""
  if not arm.landmark:
    return dict(arm.model)
  return {**arm.model, "attention_options": dict(mem_freq=WINDOW - 1, top_k=2,
                                                 landmark_token_id=vocab_size)}


def build(name: str, tok):
  """(arm, model, initial variables) of arm `name` for tokenizer `tok`."""
  from ctxjax.agent import passkey_model  # noqa: PLC0415
  arm = ARMS.get(name)
  vocab = tok.vocab_size + arm.landmark
  return (arm, *passkey_model.tiny_model(vocab, **model_overrides(arm, tok.vocab_size)))


def demo_rows(tok, n: int, width: int, seed: int = 3, data_dir: str | None = None):
  """[n, width] rows `[bos] text` of the demo corpus (ctxjax/data/corpus.py) at random
  offsets of random documents, one token per character (a character `tok` lacks as "?"),
  and their loss masks (every target)."""
  import numpy as np  # noqa: PLC0415
  from ctxjax.data import corpus  # noqa: PLC0415
  texts = [t for t, _ in corpus.read_jsonl(corpus.ensure_demo_corpus(data_dir))
           if len(t) > 2 * width]
  rng = np.random.default_rng(seed)
  tokens = np.empty((n, width), np.int32)
  for i, doc in enumerate(rng.integers(0, len(texts), n)):
    start = int(rng.integers(0, len(texts[doc]) - 2 * width))
    text = "".join(c if c in tok.index else "?" for c in texts[doc][start:start + 2 * width])
    ids = tok.encode(text)  # a phrase may span characters
    tokens[i] = [tok.bos_id, *ids[:width - 1]]
  return tokens, np.ones((n, width - 1), np.float32)


def training_rows(arm: Arm, cfg, tok, pool: int, demo_share: float = 0.0) -> dict:
  """inputs/targets/mask [N, T] of `pool` passkey rows and, for demo_share > 0, as many
  demo-corpus rows as make that share of all rows (landmark: ids inserted every 15 tokens)."""
  import numpy as np  # noqa: PLC0415
  from ctxjax.agent import passkey_model  # noqa: PLC0415
  from ctxjax.data import landmark  # noqa: PLC0415
  tokens, mask = passkey_model.training_rows(tok, pool, length=TRAIN_LENGTH * arm.length_factor)
  n_demo = round(pool * demo_share / (1.0 - demo_share))
  if n_demo:
    demo, demo_mask = demo_rows(tok, n_demo, tokens.shape[1])
    tokens, mask = np.concatenate([tokens, demo]), np.concatenate([mask, demo_mask])
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  if not arm.landmark:
    return rows
  opts = cfg.attention_options
  width = rows["inputs"].shape[1]
  seq_len = next(s for s in range(width, 2 * width + 2)
                 if landmark.content_length(s, opts["mem_freq"]) == width)
  batch = {"inputs": rows["inputs"], "targets": rows["targets"], "loss_mask": mask,
           "segment_ids": np.ones_like(rows["inputs"]),
           "positions": np.broadcast_to(np.arange(width, dtype=np.int32), mask.shape)}
  out = landmark.insert_landmarks(batch, seq_len=seq_len, mem_freq=opts["mem_freq"],
                                  landmark_id=opts["landmark_token_id"])
  return {"inputs": out["inputs"], "targets": out["targets"],
          "mask": out["loss_mask"].astype(np.float32), "positions": out["positions"],
          "segment_ids": out["segment_ids"]}


def start_from(fresh: dict, base: dict) -> dict:
  """`fresh` parameters with every leaf the base also has taken from the base; the parameters
  only the arm has (memory gates, side_*) keep their initialisation, and a larger leaf (the
  landmark id's row of the embedding and head) gets the base's values in its leading part."""
  import jax  # noqa: PLC0415
  path = jax.tree_util.keystr
  known = {path(p): x for p, x in jax.tree_util.tree_leaves_with_path(base)}

  def pick(p, x):
    b = known.get(path(p))
    return x if b is None else x.at[tuple(slice(0, n) for n in b.shape)].set(b)
  return jax.tree_util.tree_map_with_path(pick, fresh)


def train_arm(name: str, tok, steps: int, trained: dict, pool: int = POOL,
              batch: int = BATCH, demo_share: float = 0.0) -> dict:
  """{model, variables, train_sec, final_train_loss, steps} of arm `name`; `trained` holds the
  arms trained before (an arm with a base starts from the base's parameters)."""
  from ctxjax.agent import passkey_model  # noqa: PLC0415
  arm, model, variables = build(name, tok)
  if arm.base is not None:
    variables = {"params": start_from(variables["params"],
                                      trained[arm.base]["variables"]["params"])}
  rows = training_rows(arm, model.cfg, tok, pool // arm.length_factor, demo_share)
  n = max(1, steps // arm.step_divisor)
  began = time.perf_counter()
  variables, loss = passkey_model.train_rows(
      model, variables, rows, steps=n, batch=batch // arm.length_factor, peak_lr=arm.peak_lr,
      end_lr=arm.peak_lr / 10, trainable=arm.trainable,
      training=arm.landmark or model.cfg.memory_kind != "none")
  return {"model": model, "variables": variables, "train_sec": time.perf_counter() - began,
          "final_train_loss": loss, "steps": n, "batch": batch // arm.length_factor,
          "train_prompt_tokens": TRAIN_LENGTH * arm.length_factor}


# --- evaluation --------------------------------------------------------------------------------

def _plain_generate(*args, **kwargs):
  from ctxjax.eval.generation import generate  # noqa: PLC0415
  return generate(*args, **kwargs)


def _landmark_generate(model, variables, prompts, max_new_tokens, **_):
  from ctxjax.model.landmark_generate import landmark_generate  # noqa: PLC0415
  return landmark_generate(model, variables, prompts, max_new_tokens)


def eval_model(model, length: int):
  """(model to decode `length`-token prompts, generate_fn): memory arms get a memory holding
  the whole prompt."""
  from ctxjax.model import Transformer, memory_inference  # noqa: PLC0415
  cfg = model.cfg
  if cfg.memory_kind != "none":
    size = -(-(length + 1 + MAX_NEW) // WINDOW) * WINDOW
    return Transformer(dataclasses.replace(cfg, memory_size=size)), memory_inference.generate_fn
  if cfg.attention_mode == "landmark":
    return model, _landmark_generate
  return model, _plain_generate


def state_bytes(cfg, length: int) -> int:
  """Bytes per prompt row the method keeps while decoding (module doc), float32."""
  tokens = length + 1 + MAX_NEW
  per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # one layer's k and v
  if cfg.memory_kind != "none":
    return per_token * (len(cfg.memory_layers) * cfg.memory_size
                        + cfg.num_hidden_layers * cfg.memory_window)
  if cfg.attention_mode == "landmark":
    tokens += tokens // cfg.attention_options["mem_freq"]
  return per_token * cfg.num_hidden_layers * tokens


def program_bytes(model, variables, length: int) -> int:
  """temp + argument bytes (XLA memory_analysis) of the program reading a prompt, batch 1."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  cfg = model.cfg
  prompt = jnp.zeros((1, length + 1), jnp.int32)
  if cfg.memory_kind != "none":
    from ctxjax.model import memory_inference  # noqa: PLC0415
    lowered = memory_inference._window.lower(model, variables["params"],  # noqa: SLF001
                                             memory_inference.init_memory(cfg, 1),
                                             prompt[:, :WINDOW])
  elif cfg.attention_mode == "landmark":
    from ctxjax.attention.landmark import with_landmarks  # noqa: PLC0415
    from ctxjax.model import landmark_generate  # noqa: PLC0415
    slots = with_landmarks(np.zeros((1, length + 1 + MAX_NEW), np.int32),
                           cfg.attention_options["mem_freq"],
                           cfg.attention_options["landmark_token_id"])
    lowered = landmark_generate._logits.lower(model, variables, jnp.asarray(slots))  # noqa: SLF001
  else:
    from ctxjax.eval import generation  # noqa: PLC0415
    program = generation.compiled(model, 1, length + 1, MAX_NEW)
    lowered = program.prefill.lower(variables, prompt, jnp.array([length + 1], jnp.int32),
                                    jax.random.PRNGKey(0))
  mem = lowered.compile().memory_analysis()
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)


def evaluate_arm(name: str, run: dict, tok, multiples, depths, samples: int,
                 batch_size: int, echo=print) -> list[dict]:
  """Per length: passkey accuracy, state and program bytes, tokens/s (module doc)."""
  from ctxjax.eval import retrieval  # noqa: PLC0415
  out = []
  for multiple in multiples:
    length = TRAIN_LENGTH * multiple
    model, generate_fn = eval_model(run["model"], length)
    grid = lambda d, n: retrieval.retrieval_grid(  # noqa: E731
        generate_fn, model, run["variables"], tok, "passkey", [length], d, samples=n,
        batch_size=batch_size, echo=lambda _: None)
    grid(depths[:1], 1)  # compiles this shape: one batch, not timed
    start = time.perf_counter()
    result = grid(depths, samples)
    sec = time.perf_counter() - start
    prompts = len(depths) * samples
    row = {"multiple": multiple, "length": length, "prompts_per_length": prompts,
           "passkey_accuracy": result["mean_score"],
           "accuracy_by_depth": [r[0] for r in result["scores"]],
           "state_bytes": state_bytes(model.cfg, length),
           "program_bytes": program_bytes(model, run["variables"], length),
           "tokens_per_sec": prompts * (length + 1) / sec, "eval_sec": sec,
           "loadavg": list(os.getloadavg())}
    out.append(row)
    echo(f"{name:>10} {multiple:>2}x ({length:>4} tokens): passkey {row['passkey_accuracy']:.2f}"
         f"  state {row['state_bytes'] / 1024:.0f} KiB  program "
         f"{row['program_bytes'] / 1024:.0f} KiB  {row['tokens_per_sec']:.0f} tok/s")
  return out


def table(results: dict) -> str:
  """A markdown table arm x length: accuracy / state KiB / tokens/s."""
  arms = results["arms"]
  mults = [r["multiple"] for r in arms[0]["lengths"]] if arms else []
  head = "| arm | train s | loss | " + " | ".join(
      f"{m}x ({m * TRAIN_LENGTH})" for m in mults) + " |"
  lines = [head, "|" + "---|" * (3 + len(mults))]
  for a in arms:
    cells = [f"{r['passkey_accuracy']:.2f} / {r['state_bytes'] / 1024:.0f} KiB / "
             f"{r['tokens_per_sec']:.0f}" for r in a["lengths"]]
    lines.append(f"| {a['arm']} | {a['train_sec']:.0f} | {a['final_train_loss']:.3f} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
  parser.add_argument("--arms", type=lambda s: s.split(","), default=DEFAULT_ARMS)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--multiples", type=lambda s: [int(x) for x in s.split(",")],
                      default=[1, 4, 8, 16])
  parser.add_argument("--depths", type=floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
  parser.add_argument("--samples", type=int, default=10)
  parser.add_argument("--demo_share", type=float, default=0.5,
                      help="share of the training rows that are demo-corpus text")
  parser.add_argument("--batch_size", type=int, default=25)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory.json"))
  args = parser.parse_args(argv)
  for name in args.arms:
    arm = ARMS.get(name)
    if arm.base is not None and arm.base not in args.arms[:args.arms.index(name)]:
      parser.error(f"--arms: {name} starts from {arm.base}; list {arm.base} before it")
  from ctxjax.agent.passkey_model import PhraseTokenizer  # noqa: PLC0415
  if not 0.0 <= args.demo_share < 1.0:
    parser.error(f"--demo_share={args.demo_share}: give a share in [0, 1)")
  tok = PhraseTokenizer(extra_chars=string.printable)
  results = {"command": " ".join(["benchmarks/memory.py"] + (argv or sys.argv[1:])),
             "train_length": TRAIN_LENGTH, "steps": args.steps, "batch": BATCH, "pool": POOL,
             "demo_share": args.demo_share, "vocab_size": tok.vocab_size,
             "depths": args.depths, "samples_per_depth": args.samples,
             "started": measure.now(), "machine": measure.machine(), "arms": []}
  trained = {}
  began = time.perf_counter()
  for name in args.arms:
    run = trained[name] = train_arm(name, tok, args.steps, trained,
                                    demo_share=args.demo_share)
    print(f"{name}: trained {run['steps']} steps in {run['train_sec']:.0f} s, final loss "
          f"{run['final_train_loss']:.4f}", flush=True)
    lengths = evaluate_arm(name, run, tok, args.multiples, args.depths, args.samples,
                           args.batch_size, echo=lambda s: print(s, flush=True))
    results["arms"].append({"arm": name, "about": ARMS.get(name).about,
                            **{k: run[k] for k in ("train_sec", "final_train_loss", "steps",
                                                   "batch", "train_prompt_tokens")},
                            "lengths": lengths})
    results["wall_sec"] = time.perf_counter() - began
    results["machine_after"] = measure.machine()
    measure.write_json(args.out, results)
  print(table(results))


if __name__ == "__main__":
  main()
