"""The agent's state in a workdir, so a session can stop and continue:

  WORKDIR/state.json       system text, core memory, summary, the FIFO queue (context.py)
  WORKDIR/recall.jsonl     every message, in order          (+ recall.npy with an embedder)
  WORKDIR/archival.jsonl   archival documents               (+ archival.npy)
  WORKDIR/thoughts.*       Think-in-Memory's thoughts, when used (thoughts.py)

Each file is rewritten atomically (persist.py) by `save()`; `Session.open` on a workdir with a
state.json restores exactly what the last `save()` wrote.
"""
from __future__ import annotations

import os

from ctxjax.agent import persist
from ctxjax.agent.context import Budget, Count, Summarize, WorkingContext, word_count
from ctxjax.agent.store import Embed, Store


class Session:
  def __init__(self, workdir: str, context: WorkingContext, archival: Store):
    self.workdir, self.context, self.archival = workdir, context, archival

  @classmethod
  def open(cls, workdir: str, *, system: str, budget: Budget, summarize: Summarize,
           embed: Embed | None = None, count: Count = word_count,
           core: dict[str, str] | None = None) -> "Session":
    """A new session in `workdir`, or the saved one there (its system text, core memory,
    summary, queue and stores replace the arguments)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise NotADirectoryError(f"workdir={workdir} is a file; give a directory")
    state = persist.read_json(os.path.join(workdir, "state.json"))
    recall = Store.load(workdir, "recall", embed) if state else Store(embed)
    archival = Store.load(workdir, "archival", embed) if state else Store(embed)
    context = WorkingContext(system, budget, recall, summarize, count, core)
    if state:
      context.restore(state)
    return cls(workdir, context, archival)

  def save(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    self.context.recall.save(self.workdir, "recall")
    self.archival.save(self.workdir, "archival")
    persist.write_json(os.path.join(self.workdir, "state.json"), self.context.state())
