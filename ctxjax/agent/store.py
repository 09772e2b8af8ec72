"""A searchable record store: MemGPT's recall storage (every message of the conversation) and
archival storage (any documents), searched by text or by embedding, a page of results at a
time (Packer et al. 2023, Sec. 2.2-2.3: reads from external context are paginated).

  store = Store(embed=embed_fn)          # embed_fn(list[str]) -> float [N, D], or None
  store.insert("The pass key is 123.")   # -> record id
  store.search("pass key", mode="text", page=0, page_size=5)
  -> {"results": [{"id", "text", "score", "meta"}], "page", "pages", "total"}

Text search ranks the records sharing a word with the query by BM25 (ties to the older
record); embedding search by cosine similarity of the query's embedding and
the records' (unit-normalised at insertion), or ("embedding_centered") after removing their
mean. Persisted as <name>.jsonl + <name>.npy.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Sequence

import numpy as np

from ctxjax.agent import persist
from ctxjax.registry import Registry

Embed = Callable[[Sequence[str]], np.ndarray]
_WORD = re.compile(r"[a-z0-9]+")


def unit_rows(x_ND: np.ndarray) -> np.ndarray:
  x_ND = np.asarray(x_ND, np.float32)
  return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


def text_scores(query: str, texts: Sequence[str], k1: float = 1.2, b: float = 0.75
                ) -> np.ndarray:
  """Okapi BM25 of `query` against each text (Robertson & Zaragoza 2009: idf
  log(1 + (N - df + 0.5) / (df + 0.5)), term frequency saturated by k1, length-normalised by
  b), over lowercase alphanumeric words; 0 for a text sharing no word with the query. Words
  in every text (filler) weigh little; a text repeating a rare query word ranks higher."""
  docs = [_WORD.findall(t.lower()) for t in texts]
  want = set(_WORD.findall(query.lower()))
  if not docs or not want:
    return np.zeros(len(docs), np.float32)
  avg = max(sum(map(len, docs)) / len(docs), 1e-9)
  df = {w: sum(w in set(d) for d in docs) for w in want}
  idf = {w: math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5)) for w in want}
  out = np.zeros(len(docs), np.float32)
  for i, d in enumerate(docs):
    norm = k1 * (1 - b + b * len(d) / avg)
    for w in want:
      tf = d.count(w)
      out[i] += idf[w] * tf * (k1 + 1) / (tf + norm) if tf else 0.0
  return out


def paginate(order: np.ndarray, scores: np.ndarray, records: list, page: int,
             page_size: int) -> dict:
  """One page of `records` in `order` (ids of the matches, best first)."""
  if page < 0 or page_size < 1:
    raise ValueError(f"page={page} must be >= 0 and page_size={page_size} >= 1")
  total = len(order)
  chosen = order[page * page_size:(page + 1) * page_size]
  return {"results": [{**records[i], "score": round(float(scores[i]), 4)} for i in chosen],
          "page": page, "pages": math.ceil(total / page_size), "total": total}


class Store:
  """Records {"id", "text", "meta"} in insertion order, with unit vectors when `embed` is
  given (float32 [N, D])."""

  def __init__(self, embed: Embed | None = None):
    self.embed = embed
    self.records: list[dict] = []
    self.vectors: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.records)

  def insert_many(self, texts: Sequence[str], metas: Sequence[dict] | None = None) -> list[int]:
    texts = [str(t) for t in texts]
    metas = list(metas) if metas is not None else [{} for _ in texts]
    ids = list(range(len(self.records), len(self.records) + len(texts)))
    self.records += [{"id": i, "text": t, "meta": m} for i, t, m in zip(ids, texts, metas)]
    if self.embed is not None and texts:
      new = unit_rows(self.embed(texts))
      self.vectors = new if self.vectors is None else np.concatenate([self.vectors, new])
    return ids

  def insert(self, text: str, meta: dict | None = None) -> int:
    return self.insert_many([text], [meta or {}])[0]

  def scores(self, query: str, mode: str) -> np.ndarray:
    return SEARCH_MODES.get(mode)(self, query)

  def search(self, query: str, *, mode: str = "text", page: int = 0, page_size: int = 5) -> dict:
    """A page of the records matching `query`, best first (text: those sharing a word)."""
    scores = self.scores(query, mode)
    order = np.argsort(-scores, kind="stable")
    if mode == "text":
      order = order[scores[order] > 0]
    return paginate(order, scores, self.records, page, page_size)

  def save(self, folder: str, name: str) -> None:
    persist.write_jsonl(os.path.join(folder, f"{name}.jsonl"), self.records)
    if self.vectors is not None:
      persist.write_npy(os.path.join(folder, f"{name}.npy"), self.vectors)

  @classmethod
  def load(cls, folder: str, name: str, embed: Embed | None = None) -> "Store":
    store = cls(embed)
    store.records = persist.read_jsonl(os.path.join(folder, f"{name}.jsonl"))
    store.vectors = persist.read_npy(os.path.join(folder, f"{name}.npy"))
    n_vec = 0 if store.vectors is None else len(store.vectors)
    if embed is not None and n_vec != len(store.records):
      raise ValueError(f"{folder}/{name}.npy has {n_vec} vectors for {len(store.records)} "
                       f"records; the store is corrupt: delete {folder} or restore it")
    return store


def _embedding_scores(store: Store, query: str, centered: bool = False) -> np.ndarray:
  """Cosine of the query's embedding and each record's; `centered` first subtracts the mean
  record vector from both (the first step of Mu & Viswanath 2018's "all-but-the-top": mean
  pooled hidden states share a large common direction that swamps the differences)."""
  if store.embed is None:
    raise ValueError("an embedding search mode needs a store with an embedding function; "
                     "use mode='text'")
  if store.vectors is None or not len(store.records):
    return np.zeros(len(store.records), np.float32)
  q_D = unit_rows(store.embed([query]))[0]
  if not centered:
    return store.vectors @ q_D
  mean_D = store.vectors.mean(0)
  return unit_rows(store.vectors - mean_D) @ unit_rows((q_D - mean_D)[None])[0]


SEARCH_MODES: Registry[Callable[[Store, str], np.ndarray]] = Registry("mode")
SEARCH_MODES.add("text", lambda store, query: text_scores(query, [r["text"] for r in
                                                                 store.records]))
SEARCH_MODES.add("embedding", _embedding_scores)
SEARCH_MODES.add("embedding_centered", lambda store, query: _embedding_scores(store, query, True))
