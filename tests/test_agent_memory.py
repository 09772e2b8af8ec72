"""ctxjax.agent: the MemGPT-style context manager (Packer et al. 2023) driven by a scripted
policy that emits predetermined function calls, Think-in-Memory's LSH memory (Liu et al.
2023), persistence, and the mean-pooled hidden-state embedder of a tiny ctxjax model."""
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.agent import functions, lsh, persist, tim
from ctxjax.agent.agent import Agent
from ctxjax.agent.context import Budget, WorkingContext, clip, word_count
from ctxjax.agent.session import Session
from ctxjax.agent.store import Store
from ctxjax.agent.thoughts import ThoughtMemory

SYSTEM = "You are a memory agent. " + functions.describe()
BUDGET = Budget(window=220, core_limit=20, summary_limit=20)


def bag_of_words(texts, dim=64):
  """A deterministic stand-in embedder: hashed word counts."""
  out = np.zeros((len(texts), dim), np.float32)
  for i, t in enumerate(texts):
    for w in re.findall(r"[a-z0-9]+", t.lower()):
      out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1.0
  return out


def summarize(old, evicted):
  """Scripted summariser: recursive, and without the evicted facts themselves."""
  return f"{old} [{len(evicted)} older messages]".strip()


def call(name, heartbeat=False, **args):
  return json.dumps({"function": name, "arguments": {**args, "request_heartbeat": heartbeat}})


def last_function_result(prompt):
  return json.loads(prompt.rsplit("\nfunction: ", 1)[1].split("\n")[0])


class Scripted:
  """A policy emitting `script` in order (a callable entry gets the prompt), checking that
  every prompt it is shown is within the window."""

  def __init__(self, window, script=()):
    self.window, self.script, self.prompts = window, list(script), 0

  def __call__(self, prompt):
    assert word_count(prompt) <= self.window, (word_count(prompt), self.window)
    self.prompts += 1
    step = self.script.pop(0) if self.script else call("send_message", message="ok")
    return step(prompt) if callable(step) else step


def open_session(path, embed=None):
  return Session.open(str(path), system=SYSTEM, budget=BUDGET, summarize=summarize,
                      embed=embed)


@pytest.fixture
def no_fsync(monkeypatch):
  """The session saves after every event; skipping fsync keeps 100 turns fast (durability
  is not what these tests check)."""
  monkeypatch.setattr(os, "fsync", lambda fd: None)


def test_100_turns_stay_in_budget_and_recall_search_finds_the_evicted_fact(tmp_path, no_fsync):
  session = open_session(tmp_path)
  policy = Scripted(BUDGET.window)
  agent = Agent(policy, session, page_size=1)
  pushes = []  # the context's tokens after every push (events, calls, results, alerts)
  push = session.context.push
  session.context.push = lambda *a: (push(*a), pushes.append(session.context.tokens()))[0]
  agent.handle("Remember this: my locker code is 7319.")
  for turn in range(2, 101):
    agent.handle(f"Turn {turn}: today I walked {turn} steps around the old harbour.")
    assert session.context.tokens() <= BUDGET.window
  assert policy.prompts == 100 and len(pushes) >= 300 and max(pushes) <= BUDGET.window
  ctx = session.context
  assert ctx.evictions > 0 and "older messages" in ctx.summary
  assert any("memory pressure" in r["text"] for r in ctx.recall.records)
  assert not any("7319" in m["text"] for m in ctx.fifo) and "7319" not in ctx.render()

  found = []

  def answer(prompt):  # the scripted policy reads the search result in its prompt
    found.append(last_function_result(prompt)["result"])
    return call("send_message", message=next(
        r["text"] for r in found[-1]["results"] if re.search(r"\d", r["text"])))
  agent.page_size = 3
  policy.script = [call("recall_search", heartbeat=True, query="locker code"), answer]
  replies = agent.handle("What is my locker code?")
  assert replies == ["Remember this: my locker code is 7319."]
  assert found[0]["total"] == 3  # the fact, the question, the search call itself
  assert session.context.tokens() <= BUDGET.window


def test_pressure_alert_then_flush_with_recursive_summary(tmp_path):
  ctx = WorkingContext("sys", Budget(window=120, core_limit=5, summary_limit=10), Store(),
                       summarize)
  alerts, evictions, tokens = [], [], []
  for i in range(40):
    ctx.push("user", f"message {i} with five words")
    tokens.append(ctx.tokens())
    alerts.append(sum("memory pressure" in r["text"] for r in ctx.recall.records))
    evictions.append(ctx.evictions)
  assert max(tokens) <= 120
  first_alert, first_flush = alerts.index(1), next(i for i, e in enumerate(evictions) if e)
  assert first_alert < first_flush  # the warning (70%) comes before the flush (100%)
  assert tokens[first_alert] > 0.7 * 120 and alerts[first_flush] == 1  # one per period
  assert alerts[-1] >= 2
  long = ctx.push("function", "word " * 100)  # longer than evict_frac x window / 2
  assert word_count(long["text"]) <= 30 and ctx.tokens() <= 120
  assert ctx.recall.records[long["id"]]["text"] == "word " * 100  # whole in recall
  assert ctx.summary.count("older messages") >= 2  # the summary folds the previous one in
  with pytest.raises(ValueError, match="budget.window=20 is too small"):
    WorkingContext("a long system text " * 3, Budget(window=20, core_limit=5,
                                                     summary_limit=5), Store(), summarize)


def test_clip_and_core_memory_limits(tmp_path):
  assert clip("a b c d e f", 4, word_count) == "a b c ..."
  ctx = WorkingContext("s", BUDGET, Store(), summarize, core={"human": "name: Ada"})
  ctx.core_append("human", "likes tea")
  ctx.core_replace("human", "tea", "coffee")
  assert ctx.core["human"] == "name: Ada likes coffee"
  with pytest.raises(ValueError, match="does not contain 'milk'"):
    ctx.core_replace("human", "milk", "x")
  with pytest.raises(ValueError, match="over core_limit=20"):
    ctx.core_append("persona", "word " * 30)
  wordy = WorkingContext("s", BUDGET, Store(), lambda old, ev: old + " long summary" * 50)
  while not wordy.evictions:
    wordy.push("user", "one more message of seven words")
  assert word_count(wordy.summary) <= BUDGET.summary_limit and wordy.tokens() <= BUDGET.window


def test_archival_search_returns_the_inserted_document_by_text_and_embedding(tmp_path):
  session = open_session(tmp_path, embed=bag_of_words)
  docs = ["The harbour opens at six in the morning.", "Zebras sleep standing up.",
          "The pass key is 41872. Remember it.", "Green tea is brewed at eighty degrees."]
  agent = Agent(Scripted(BUDGET.window, [call("archival_insert", True, content=d)
                                         for d in docs]), session, page_size=2)
  agent.handle("Please store these documents.")
  assert [r["text"] for r in session.archival.records] == docs
  for mode in ("text", "embedding"):
    page = session.archival.search("what is the pass key", mode=mode, page_size=2)
    assert page["results"][0]["text"] == docs[2], mode
  filler = Store()  # BM25: rare words weigh, repeated ones more, common ones little
  filler.insert_many(["the sky is blue. the pass key is", "the sky is blue. the sky is blue",
                      "the pass key is 7. remember it. 7 is the pass key.", "the sun is hot"])
  assert [r["id"] for r in filler.search("the pass key is")["results"]] == [2, 0, 1, 3]
  line, heartbeat = functions.execute(agent, call("archival_search", query="pass key",
                                                  page=1, mode="embedding"))
  result = json.loads(line)["result"]
  assert not heartbeat and result["page"] == 1 and result["pages"] == 2
  assert docs[2] not in [r["text"] for r in result["results"]]  # page 0 had it


def test_centered_embedding_search_removes_the_common_direction():
  common, eye = np.full(16, 2.5, np.float32), np.eye(16, dtype=np.float32)
  scale = [3, 1, 1, 1, 1, 1]  # doc i = scale_i x common + its own direction e_i
  table = {f"doc {i}": a * common + eye[i] for i, a in enumerate(scale)}
  table["query"] = common + 0.3 * eye[3]  # mostly the common direction, a little of doc 3's
  store = Store(embed=lambda texts: np.stack([table[t] for t in texts]))
  store.insert_many([f"doc {i}" for i in range(6)])
  plain = store.search("query", mode="embedding")["results"][0]["text"]
  assert store.search("query", mode="embedding_centered")["results"][0]["text"] == "doc 3"
  assert plain != "doc 3"  # plain cosine follows the shared direction


def test_malformed_calls_get_an_error_and_the_loop_goes_on(tmp_path):
  session = open_session(tmp_path)
  policy = Scripted(BUDGET.window, ["I think I should answer now", '{"function": "send_mesage"}',
                                    call("archival_search", query=3, bogus=1),
                                    '{"function": "send_message", "arguments": {"message": ',
                                    call("send_message", message="recovered")])
  agent = Agent(policy, session)
  assert agent.handle("hello") == ["recovered"]
  errors = [r["text"] for r in session.context.recall.records if r["text"].startswith("error:")]
  assert len(errors) == 4
  assert "no JSON object" in errors[0] and "did you mean 'send_message'" in errors[1]
  assert "unknown arguments ['bogus']" in errors[2] and "malformed JSON" in errors[3]
  assert agent.handle("still there?") == ["ok"]


def test_heartbeat_chains_and_max_chain_bounds_it(tmp_path):
  session = open_session(tmp_path)
  agent = Agent(Scripted(BUDGET.window, [call("archival_insert", True, content="x")] * 20),
                session, max_chain=3)
  assert agent.handle("go") == [] and agent.steps == 3 and len(session.archival) == 3
  agent = Agent(Scripted(BUDGET.window, [call("archival_insert", False, content="y")] * 5),
                session)
  agent.handle("go")
  assert agent.steps == 1  # no heartbeat: the loop yields after one call


def test_a_restarted_session_sees_the_same_stores(tmp_path, no_fsync):
  session = open_session(tmp_path, embed=bag_of_words)
  agent = Agent(Scripted(BUDGET.window, [
      call("core_memory_append", True, section="human", content="name Ada"),
      call("archival_insert", True, content="The pass key is 41872.")]), session)
  for i in range(15):
    agent.handle(f"message number {i} about the weather and the sea")
  again = open_session(tmp_path, embed=bag_of_words)
  assert again.context.recall.records == session.context.recall.records
  np.testing.assert_array_equal(again.archival.vectors, session.archival.vectors)
  assert again.context.state() == session.context.state()
  assert again.context.core == {"human": "name Ada"} and again.context.summary
  assert again.archival.search("pass key", mode="embedding")["results"][0]["text"] == \
      "The pass key is 41872."


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
  path = str(tmp_path / "recall.jsonl")
  persist.write_jsonl(path, [{"id": 0}])

  def fail(*_):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    persist.write_jsonl(path, [{"id": 0}, {"id": 1}])
  assert persist.read_jsonl(path) == [{"id": 0}] and os.listdir(tmp_path) == ["recall.jsonl"]


# --- Think-in-Memory


def test_lsh_hash_is_argmax_of_the_signed_projections():
  r = lsh.planes(8, 6, seed=3)
  x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  proj = x @ r
  want = np.where(proj.max(1) >= -proj.min(1), proj.argmax(1), 3 + (-proj).argmax(1))
  np.testing.assert_array_equal(lsh.hash_buckets(x, r), want)
  assert lsh.probe_order(x[0], r)[0] == want[0]
  with pytest.raises(ValueError, match="buckets=5"):
    lsh.planes(8, 5)


def test_tim_retrieves_within_the_query_bucket_and_falls_back_when_empty(tmp_path):
  mem = ThoughtMemory(bag_of_words, buckets=8, seed=0)
  facts = [("Ada", "lives in", "Lisbon"), ("Ada", "works as", "a nurse"),
           ("Bob", "owns", "a red bicycle"), "zebras sleep standing up",
           "green tea is brewed at eighty degrees", ("Carol", "plays", "the cello")]
  mem.insert_many(facts)
  for query in ["where does Ada live", "what does Bob own", "how is green tea brewed"]:
    got = mem.retrieve(query, k=2)
    q_bucket = lsh.hash_buckets(bag_of_words([query]), mem.planes)[0]
    in_bucket = [r for r in mem.records if r["bucket"] == q_bucket]
    if in_bucket:
      assert mem.last_probes == 1 and {r["bucket"] for r in got} == {q_bucket}
    else:  # the paper's bucket is empty: the first non-empty probe answers
      assert mem.last_probes > 1 and got
  empty = [b for b in range(8) if b not in {r["bucket"] for r in mem.records}]
  assert empty  # 6 thoughts in 8 buckets
  # a query aimed at an empty bucket j: x = +-R[:, j] maximises that signed projection
  col = mem.planes[:, empty[0] % 4] * (1 if empty[0] < 4 else -1)
  assert lsh.hash_buckets(col[None], mem.planes)[0] == empty[0]
  mem.embed = lambda texts: np.stack([col for _ in texts])
  got = mem.retrieve("anything", k=1)
  assert mem.last_probes > 1 and len(got) == 1 and got[0]["bucket"] != empty[0]


def test_tim_insert_forget_merge_and_a_turn_recalls_thoughts(tmp_path):
  by_head = lambda texts: np.asarray([[1.0, 0.0] if t.startswith("Ada") else [0.0, 1.0]
                                      for t in texts], np.float32)
  mem = ThoughtMemory(by_head, buckets=4, seed=1)
  mem.insert_many([("Ada", "lives in", "Lisbon"), ("Ada", "lives in", "Porto"), "it rains"])
  assert mem.forget(lambda r: r["tail"] == "Lisbon") == 1 and len(mem) == 2
  mem.insert(("Ada", "likes", "tea"))
  assert mem.merge() == 1  # the two thoughts about Ada (one bucket) become one
  ada = [r for r in mem.records if r["head"] == "Ada"]
  assert len(ada) == 1 and ada[0]["text"] == "Ada lives in Porto; Ada likes tea"
  assert len(mem.vectors) == len(mem) == 2 and mem.merge() == 0

  memory = ThoughtMemory(bag_of_words, buckets=2, seed=0)
  seen = []
  answer, _ = tim.turn(memory, "I moved to Lisbon last year", lambda q, t: (seen.append(t),
                       "Nice, Lisbon!")[1], lambda q, a: [("user", "lives in", "Lisbon")])
  assert seen == [[]]
  tim.turn(memory, "where does the user live", lambda q, t: (seen.append(t), "Lisbon")[1],
           lambda q, a: [])
  assert seen[1] == ["user lives in Lisbon"]  # the thought, not the raw history
  memory.save(str(tmp_path))
  again = ThoughtMemory.load(str(tmp_path), bag_of_words, buckets=2)
  assert again.records == memory.records and again.retrieve("where", 1) == \
      memory.retrieve("where", 1)


# --- the model's own embeddings


@pytest.fixture(scope="module")
def tiny():
  from ctxjax.agent.passkey_model import PhraseTokenizer
  from ctxjax.model import Transformer, model_config_from_dict
  tok = PhraseTokenizer()
  cfg = model_config_from_dict(dict(
      vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
      scan_layers=False, dtype="float32"))
  model = Transformer(cfg)
  # random weights of the right shapes without compiling init
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  return tok, model, jax.tree.map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_hidden_state_embedder_is_the_masked_mean_of_the_final_norm(tiny):
  from ctxjax.agent.embed import hidden_state_embedder
  from ctxjax.model.layers import RMSNorm
  tok, model, variables = tiny
  texts = ["The pass key is 123. Remember it. ", "The grass is green. The sky is blue."]
  embed = hidden_state_embedder(model, variables, tok, max_tokens=24, batch_size=4)
  got = embed(texts)
  assert got.shape == (2, 32)
  ids = [tok.bos_id] + tok.encode(texts[0])

  class Hidden(type(model)):  # the reference: the model's own final norm, no padding
    def _head(self, embed_, x):
      return RMSNorm(self.cfg, name="norm")(x)
  ref = jax.jit(Hidden(model.cfg).apply)(variables, jnp.asarray([ids]))[0].mean(0)
  np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got[0], got[1], atol=1e-3)


def test_passkey_pages_keep_the_needle_whole_in_some_page():
  from ctxjax.agent.passkey import paginate_document
  from ctxjax.agent.passkey_model import PhraseTokenizer
  from ctxjax.data import synthetic
  tok = PhraseTokenizer()
  for depth in (0.0, 0.37, 1.0):
    s = synthetic.passkey_sample(tok, length=320, depth=depth, seed=[0, 1])
    head, question, pages, (a, b) = paginate_document(tok, s, 40)
    assert all(len(head) + len(p) + len(question) == 40 for _, p in pages)
    body = s.prompt_ids.tolist()[len(head):320 - len(question)]
    assert pages[0][0] == 0 and pages[-1][0] + len(pages[-1][1]) == len(body)
    assert any(st <= a and b <= st + len(p) for st, p in pages)
    assert str(s.metadata["passkey"]) in tok.decode(body[a:b])
  with pytest.raises(ValueError, match="leaves"):
    paginate_document(tok, s, 12)


def test_passkey_command_user_error_is_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "ctxjax.agent.passkey", f"--out={tmp_path}/o",
                         f"--workdir={tmp_path}/nope"], cwd=root, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"ctxjax.agent.passkey: --workdir={tmp_path}/nope: no such directory; give a ctxjax run "
      f"directory")
  assert "Traceback" not in proc.stderr


def test_model_policy_keeps_the_prompt_tail_and_cuts_at_eos():
  from ctxjax.agent.model_policy import summarizer, text_generator, token_count

  class Chars:  # a character-level stand-in tokenizer
    bos_id, eos_id = 1, 2
    encode = staticmethod(lambda text: [ord(c) + 3 for c in text])
    decode = staticmethod(lambda ids: "".join(chr(i - 3) for i in ids if i > 2))
  tok, seen = Chars(), []

  def fake_generate(model, variables, rows, max_new, eos_id):
    seen.append(rows.tolist())
    new = tok.encode("42") + [eos_id] + tok.encode("7")
    return np.concatenate([rows, [new[:max_new]]], axis=1)
  gen = text_generator(None, None, tok, max_new_tokens=4, max_prompt_tokens=5,
                       generate_fn=fake_generate)
  assert gen("0123456789") == "42"
  assert seen[-1] == [[tok.bos_id, *tok.encode("6789")]]  # bos + the last 4 tokens
  whole = text_generator(None, None, tok, max_new_tokens=4, generate_fn=fake_generate)
  assert summarizer(whole)("old", [{"role": "user", "text": "hi"}]) == "42"
  prompt = tok.decode(seen[-1][0])
  assert "Previous summary: old\nMessages:\nuser: hi\nSummary:" in prompt  # recursive
  assert token_count(tok)("12 3") == 4
