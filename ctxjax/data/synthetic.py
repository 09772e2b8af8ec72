"""Synthetic long-context retrieval tasks, for training mixtures and for evaluation.

Tasks (``TASKS``, name -> sample function):
  passkey          Mohtashami & Jaggi (2023; landmark ``run_test.py``): an
                   instruction, "garbage" filler ("The grass is green. ..."), the
                   line "The pass key is N. Remember it. N is the pass key." at a
                   depth, and "What is the pass key? The pass key is" last;
                   N ~ U{1..50000}.
  needle           Fu et al. (2024) / gkamradt needle in a haystack: the San
                   Francisco needle sentence at a depth of real text (e.g. demo
                   corpus documents) inside Fu et al.'s book prompt.
  niah_single, niah_multikey, niah_multivalue, niah_multiquery
                   RULER (Hsieh et al. 2024): needles "One of the special magic
                   numbers for {key} is: {value}." with ``num_keys`` keys
                   (the others are distractors), ``num_values`` values per key
                   and ``num_queries`` keys asked for; the haystack is real text,
                   or RULER's "repeat" noise when none is given.

Each sample is assembled in token space with the given Tokenizer (anything
with ``encode(str) -> list[int]`` and ``decode(ids) -> str``), so
``prompt_ids`` has exactly ``length`` tokens (no bos: the model reads
``[bos] + prompt_ids``) and the needle spans are exact token ranges. The
filler is cut to fit; a needle goes at token ``floor(depth x filler length)``
of the filler, moved back to the nearest sentence end (a token ending in
``. ! ? \\n``) as in gkamradt's tester; ``metadata["needle_depths"]`` has the
realised depths. ``answer`` is the continuation to score (``" 31337"``);
``prompt`` is ``decode(prompt_ids)``. Everything is deterministic from ``seed``
(an int or a sequence of ints, as numpy's ``default_rng`` takes).

``synthetic_records`` yields SlimPajama-shaped JSONL records (``text`` = prompt
+ answer, source ``synthetic_<task>``), so a task can be a mixture source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ctxjax.registry import Registry

PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                  "and memorize them. I will quiz you about the important information there.\n")
GARBAGE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again.")
PASSKEY_NEEDLE = "\nThe pass key is {k}. Remember it. {k} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

FU_HEADER = "This is a very long story book: <book> "
FU_NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores "
             "Park on a sunny day.")
FU_QUESTION = "What is the best thing to do in San Francisco?"
FU_TAIL = " </book>.\nBased on the content of the book, Question: {question}\nAnswer:"

RULER_HEADER = ("Some special magic numbers are hidden within the following text. Make sure "
                "to memorize it. I will quiz you about the numbers afterwards.\n")
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_QUESTION = ("\nWhat are all the special magic numbers for {query} mentioned in the "
                  "provided text? The special magic {noun} for {query} mentioned in the "
                  "provided text {verb}")
# RULER draws keys from wonderwords' adjective-noun pairs; a fixed list keeps us offline.
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow",
               "icy", "jolly", "kind", "lucky", "mellow", "noisy", "odd", "plain", "quick",
               "rusty", "silent", "tall", "urban", "vivid", "witty", "young", "zesty",
               "bitter", "crisp", "damp", "early", "faint")
_NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor",
          "island", "jacket", "kettle", "ladder", "meadow", "needle", "orchid", "pepper",
          "quarry", "rocket", "saddle", "tunnel", "umbrella", "valley", "wagon", "yacht",
          "zebra", "basket", "cactus", "dolphin", "ember", "fossil")


@dataclasses.dataclass(frozen=True)
class Sample:
  task: str
  prompt: str
  prompt_ids: np.ndarray  # int32 [length]
  answer: str             # the continuation to score
  answers: tuple[str, ...]  # the values a correct answer contains
  metadata: dict[str, Any]  # length, depth, needle_depths, needle_spans [(start, end)], ...


@functools.lru_cache(maxsize=8)
def _sentence_end_ids(tok) -> frozenset[int]:
  """Ids whose piece ends a sentence: insertion points back up to one of these."""
  size = getattr(tok, "vocab_size", None)
  if size is None:
    return frozenset()
  return frozenset(i for i in range(size)
                   if tok.decode([i]).rstrip(" ").endswith((".", "!", "?", "\n")))


def _repeat_ids(tok, unit: str, n: int) -> np.ndarray:
  """At least ``n`` token ids of ``unit`` repeated (space-joined)."""
  per = max(1, len(tok.encode(unit)))
  return np.asarray(tok.encode(" ".join([unit] * (n // per + 2))), np.int32)


def _haystack_ids(tok, texts: Sequence[str], n: int, rng: np.random.Generator) -> np.ndarray:
  """At least ``n`` ids of ``texts`` joined by blank lines, from a seeded start document."""
  if not texts:
    raise ValueError("haystack is empty: give texts (e.g. demo corpus documents)")
  sep = tok.encode("\n\n")
  out, total, start = [], 0, int(rng.integers(len(texts)))
  i = start
  while total < n:
    ids = tok.encode(texts[i % len(texts)])
    out.extend((ids, sep))
    total += len(ids) + len(sep)
    i += 1
    if i - start == len(texts) and total == len(texts) * len(sep):
      raise ValueError("haystack texts encode to no tokens")
  return np.asarray([t for part in out for t in part], np.int32)


def _assemble(tok, task: str, header: str, filler: np.ndarray,
              needles: Sequence[tuple[float, str]], tail: str, *, length: int,
              answer: str, answers: Sequence[str], **metadata) -> Sample:
  """header + filler with needles at depths + tail, exactly ``length`` tokens."""
  head_ids, tail_ids = tok.encode(header), tok.encode(tail)
  needle_ids = [tok.encode(text) for _, text in needles]
  budget = int(length) - len(head_ids) - len(tail_ids) - sum(map(len, needle_ids))
  if budget < 0:
    raise ValueError(f"length={length} is too short for task {task!r}: it needs at least "
                     f"{int(length) - budget} tokens without filler")
  if len(filler) < budget:
    raise ValueError(f"filler has {len(filler)} tokens, {budget} needed")
  filler = filler[:budget]
  ends = _sentence_end_ids(tok)
  positions = []
  for depth, _ in needles:
    pos = int(np.floor(float(depth) * budget))
    while pos > 0 and ends and int(filler[pos - 1]) not in ends:
      pos -= 1
    positions.append(pos)
  order = sorted(range(len(needles)), key=lambda j: (positions[j], j))
  parts, spans, at, cur = [np.asarray(head_ids, np.int32)], [None] * len(needles), 0, len(head_ids)
  for j in order:
    parts.append(filler[at:positions[j]])
    cur += positions[j] - at
    at = positions[j]
    parts.append(np.asarray(needle_ids[j], np.int32))
    spans[j] = (cur, cur + len(needle_ids[j]))
    cur += len(needle_ids[j])
  parts += [filler[at:], np.asarray(tail_ids, np.int32)]
  ids = np.concatenate(parts).astype(np.int32)
  assert len(ids) == int(length), (len(ids), length)
  meta = {"task": task, "length": int(length),
          "needle_depths": [p / budget if budget else 0.0 for p in positions],
          "needle_spans": spans, "filler_tokens": budget, **metadata}
  return Sample(task, tok.decode(ids.tolist()), ids, answer, tuple(answers), meta)


def _check_depth(depth: float) -> float:
  if not 0.0 <= float(depth) <= 1.0:
    raise ValueError(f"depth={depth}: a fraction in [0, 1]")
  return float(depth)


def passkey_sample(tok, *, length: int, depth: float, seed, passkey: int | None = None,
                   haystack: Sequence[str] | None = None) -> Sample:
  """Mohtashami & Jaggi's passkey prompt; ``haystack`` replaces the garbage filler."""
  rng = np.random.default_rng(seed)
  k = int(rng.integers(1, 50001)) if passkey is None else int(passkey)
  depth = _check_depth(depth)
  filler = (_repeat_ids(tok, GARBAGE, length) if haystack is None
            else _haystack_ids(tok, haystack, length, rng))
  return _assemble(tok, "passkey", PASSKEY_HEADER, filler,
                   [(depth, PASSKEY_NEEDLE.format(k=k))], PASSKEY_QUESTION, length=length,
                   answer=f" {k}", answers=(str(k),), depth=depth, passkey=k)


def needle_sample(tok, *, length: int, depth: float, seed, haystack: Sequence[str] | None,
                  needle: str = FU_NEEDLE, question: str = FU_QUESTION) -> Sample:
  """Fu et al.'s needle-in-a-haystack prompt over real ``haystack`` text."""
  if haystack is None:
    raise ValueError("task 'needle' needs haystack texts (e.g. demo corpus documents)")
  depth = _check_depth(depth)
  filler = _haystack_ids(tok, haystack, length, np.random.default_rng(seed))
  return _assemble(tok, "needle", FU_HEADER, filler, [(depth, f"\n{needle}\n")],
                   FU_TAIL.format(question=question), length=length, answer=f" {needle}",
                   answers=(needle,), depth=depth)


def niah_sample(tok, *, length: int, depth: float, seed, haystack: Sequence[str] | None = None,
                num_keys: int = 1, num_values: int = 1, num_queries: int = 1,
                task: str = "niah") -> Sample:
  """RULER's needle in a haystack: ``num_keys`` keys (``num_queries`` asked, the
  rest distractors), ``num_values`` 7-digit values each. The first queried key's
  first value sits at ``depth``; every other needle at a seeded random depth."""
  if not 1 <= num_queries <= num_keys:
    raise ValueError(f"num_queries={num_queries} must be in [1, num_keys={num_keys}]")
  if num_values < 1 or num_keys > len(_ADJECTIVES) * len(_NOUNS):
    raise ValueError(f"num_values={num_values} must be >= 1 and num_keys={num_keys} "
                     f"<= {len(_ADJECTIVES) * len(_NOUNS)}")
  depth = _check_depth(depth)
  rng = np.random.default_rng(seed)
  pairs = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=num_keys, replace=False)
  keys = [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]
  values = rng.choice(9_000_000, size=(num_keys, num_values), replace=False) + 1_000_000
  queried = sorted(rng.choice(num_keys, size=num_queries, replace=False).tolist())
  needles = []
  for i in queried + [i for i in range(num_keys) if i not in queried]:
    for j in range(num_values):
      d = depth if not needles else float(rng.uniform())
      needles.append((d, f"\n{RULER_NEEDLE.format(key=keys[i], value=values[i, j])}\n"))
  answers = [str(values[i, j]) for i in queried for j in range(num_values)]
  names = [keys[i] for i in queried]
  query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
  many = len(answers) > 1
  tail = RULER_QUESTION.format(query=query, noun="numbers" if many else "number",
                               verb="are" if many else "is")
  filler = (_repeat_ids(tok, GARBAGE, length) if haystack is None
            else _haystack_ids(tok, haystack, length, rng))
  return _assemble(tok, task, RULER_HEADER, filler, needles, tail, length=length,
                   answer=" " + ", ".join(answers) + ".", answers=answers, depth=depth,
                   keys=keys, query_keys=names,
                   answer_needles=list(range(len(answers))))  # indices into needle_spans


TASKS: Registry[Callable[..., Sample]] = Registry("task")
TASKS.add("passkey", passkey_sample)
TASKS.add("needle", needle_sample)
TASKS.add("niah_single", functools.partial(niah_sample, task="niah_single"))
TASKS.add("niah_multikey", functools.partial(niah_sample, num_keys=4, task="niah_multikey"))
TASKS.add("niah_multivalue", functools.partial(niah_sample, num_values=4, task="niah_multivalue"))
TASKS.add("niah_multiquery", functools.partial(niah_sample, num_keys=4, num_queries=2,
                                               task="niah_multiquery"))


def make_sample(task: str, tok, **kwargs) -> Sample:
  return TASKS.get(task)(tok, **kwargs)


def synthetic_records(tok, task: str, *, num_samples: int, lengths: Sequence[int],
                      depths: Sequence[float] | None = None, seed: int = 0,
                      haystack: Sequence[str] | None = None,
                      **task_kwargs) -> Iterator[dict[str, Any]]:
  """SlimPajama-shaped records ``{"text": prompt + answer, "meta": {...}}``.

  Sample i has length ``lengths[i % len(lengths)]`` and depth
  ``depths[(i // len(lengths)) % len(depths)]`` (a grid), or a seeded uniform
  depth when ``depths`` is None; its seed is ``(seed, i)``.
  """
  TASKS.check(task)
  if not lengths:
    raise ValueError("lengths is empty")
  for i in range(int(num_samples)):
    length = int(lengths[i % len(lengths)])
    depth = (float(np.random.default_rng([seed, i, 1]).uniform()) if depths is None
             else float(depths[(i // len(lengths)) % len(depths)]))
    s = TASKS[task](tok, length=length, depth=depth, seed=[seed, i], haystack=haystack,
                    **task_kwargs)
    meta = {"redpajama_set_name": f"synthetic_{task}", "task": task, "answer": s.answer,
            "length": length, "depth": depth, "seed": [int(seed), i]}
    yield {"text": s.prompt + s.answer, "meta": meta}


def write_jsonl(path: str, records) -> int:
  """Writes records one per line; returns how many."""
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
      n += 1
  return n
