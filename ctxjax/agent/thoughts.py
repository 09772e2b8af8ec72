"""Think-in-Memory's memory of thoughts (Liu et al. 2023): the model's distilled
"inductive thoughts" (relation triples (head, relation, tail) or short statements), stored
in an LSH-indexed table (lsh.py) instead of the raw history, with the paper's operations:

  insert(thought)        embed, hash to a bucket, store
  forget(predicate)      drop the thoughts it selects (e.g. contradicted or obsolete ones)
  merge(merge_fn)        thoughts of one bucket about the same head entity become one
  retrieve(query, k)     the k most similar thoughts (cosine) within the query's bucket

The paper retrieves only inside the query's bucket and does not say what happens when that
bucket is empty; here retrieval then probes the next buckets in the query's score order
(multi-probe LSH) and uses the first non-empty one, so a query gets an answer whenever the
memory holds any thought. Persisted as thoughts.jsonl + thoughts.npy + thoughts_planes.npy.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ctxjax.agent import lsh, persist
from ctxjax.agent.store import Embed, unit_rows

Thought = str | tuple[str, str, str]


def thought_text(thought: Thought) -> str:
  return " ".join(thought) if isinstance(thought, (tuple, list)) else str(thought)


def merge_texts(texts: Sequence[str]) -> str:
  """Default merge: the distinct thoughts joined, oldest first."""
  return "; ".join(dict.fromkeys(texts))


class ThoughtMemory:
  """Records {"id", "text", "head", "relation", "tail", "bucket"} with unit vectors [N, D]."""

  def __init__(self, embed: Embed, buckets: int = 16, seed: int = 0):
    self.embed, self.buckets, self.seed = embed, int(buckets), int(seed)
    self.records: list[dict] = []
    self.vectors: np.ndarray | None = None
    self.planes: np.ndarray | None = None
    self.next_id = 0
    self.last_probes = 0  # buckets probed by the last retrieve

  def __len__(self) -> int:
    return len(self.records)

  def _hash(self, v_ND: np.ndarray) -> np.ndarray:
    if self.planes is None:
      self.planes = lsh.planes(v_ND.shape[-1], self.buckets, self.seed)
    return lsh.hash_buckets(v_ND, self.planes)

  def insert_many(self, thoughts: Sequence[Thought]) -> list[int]:
    if not thoughts:
      return []
    texts = [thought_text(t) for t in thoughts]
    v_ND = unit_rows(self.embed(texts))
    ids = []
    for t, text, b in zip(thoughts, texts, self._hash(v_ND)):
      triple = tuple(t) if isinstance(t, (tuple, list)) else (None, None, None)
      if len(triple) != 3:
        raise ValueError(f"a thought is a statement or a (head, relation, tail) triple, got "
                         f"{t!r}")
      self.records.append({"id": self.next_id, "text": text, "head": triple[0],
                           "relation": triple[1], "tail": triple[2], "bucket": int(b)})
      ids.append(self.next_id)
      self.next_id += 1
    self.vectors = v_ND if self.vectors is None else np.concatenate([self.vectors, v_ND])
    return ids

  def insert(self, thought: Thought) -> int:
    return self.insert_many([thought])[0]

  def forget(self, predicate: Callable[[dict], bool]) -> int:
    """Drops the thoughts `predicate(record)` selects; -> how many."""
    keep = [i for i, r in enumerate(self.records) if not predicate(r)]
    dropped = len(self.records) - len(keep)
    self.records = [self.records[i] for i in keep]
    if self.vectors is not None:
      self.vectors = self.vectors[keep]
    return dropped

  def merge(self, merge_fn: Callable[[Sequence[str]], str] = merge_texts) -> int:
    """Every group of >1 thoughts sharing bucket and head entity becomes one thought,
    `merge_fn(their texts)` (re-embedded and re-hashed); -> how many groups merged."""
    groups: dict[tuple, list[dict]] = {}
    for r in self.records:
      if r["head"] is not None:
        groups.setdefault((r["bucket"], r["head"]), []).append(r)
    merged = [g for g in groups.values() if len(g) > 1]
    if not merged:
      return 0
    gone = {r["id"] for g in merged for r in g}
    self.forget(lambda r: r["id"] in gone)
    for g in merged:
      text = merge_fn([r["text"] for r in g])
      self.insert(text)
      self.records[-1].update(head=g[0]["head"], relation="merged", merged_from=[
          r["id"] for r in g])
    return len(merged)

  def retrieve(self, query: str, k: int = 3) -> list[dict]:
    """Top-k by cosine within the query's bucket (or the first non-empty probe)."""
    if not self.records:
      self.last_probes = 0
      return []
    q_D = unit_rows(self.embed([query]))[0]
    self._hash(q_D[None])
    bucket_of = np.asarray([r["bucket"] for r in self.records])
    for n, b in enumerate(lsh.probe_order(q_D, self.planes), 1):
      idx = np.flatnonzero(bucket_of == b)
      if len(idx):
        self.last_probes = n
        sims = self.vectors[idx] @ q_D
        best = idx[np.argsort(-sims, kind="stable")[:k]]
        return [{**self.records[i], "score": round(float(self.vectors[i] @ q_D), 4)}
                for i in best]
    raise AssertionError("unreachable: some bucket holds a thought")

  def save(self, folder: str) -> None:
    persist.write_jsonl(os.path.join(folder, "thoughts.jsonl"), self.records)
    if self.vectors is not None:
      persist.write_npy(os.path.join(folder, "thoughts.npy"), self.vectors)
      persist.write_npy(os.path.join(folder, "thoughts_planes.npy"), self.planes)

  @classmethod
  def load(cls, folder: str, embed: Embed, buckets: int = 16, seed: int = 0
           ) -> "ThoughtMemory":
    mem = cls(embed, buckets, seed)
    mem.records = persist.read_jsonl(os.path.join(folder, "thoughts.jsonl"))
    mem.vectors = persist.read_npy(os.path.join(folder, "thoughts.npy"))
    mem.planes = persist.read_npy(os.path.join(folder, "thoughts_planes.npy"))
    if mem.planes is not None and mem.planes.shape[1] * 2 != mem.buckets:
      raise ValueError(f"{folder}/thoughts_planes.npy has {mem.planes.shape[1] * 2} buckets, "
                       f"not buckets={buckets}; pass buckets={mem.planes.shape[1] * 2}")
    mem.next_id = max((r["id"] for r in mem.records), default=-1) + 1
    return mem
