"""MemGPT's main context and queue manager (Packer et al. 2023, Sec. 2.1-2.2).

The working context given to the model is, in order: the read-only system text, the pinned
core memory (named sections the model edits with core_memory_append/replace), the recursive
summary of evicted messages, and a FIFO of recent messages. Every message also goes to the
recall store at once, so eviction never loses it. After each push the queue manager checks
the rendered prompt's tokens against the window:

  > warning_frac x window (paper: "e.g. 70%")  -> a "memory pressure" system alert is queued,
      once per flush period, so the model can save what matters to core/archival memory;
  > flush_frac x window  (paper: "e.g. 100%")  -> the oldest messages holding at least
      evict_frac x window tokens (paper: "e.g. 50% of the context window") are evicted and
      `summarize(old_summary, evicted)` becomes the new (recursive) summary.

(letta, the paper's code, uses 0.75 for the warning and flush fractions instead.) The prompt
therefore never exceeds flush_frac x window once `push` returns: the summary is clipped to
`summary_limit` tokens, core memory refuses edits past `core_limit`, and a message too long
for the queue is clipped in context (its full text stays in recall storage).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ctxjax.agent.store import Store

Count = Callable[[str], int]
Summarize = Callable[[str, Sequence[dict]], str]
PRESSURE_ALERT = ("memory pressure: the queue is at {pct}% of the window; its oldest messages "
                  "will soon move to recall storage. Save what matters with "
                  "core_memory_append or archival_insert.")


def word_count(text: str) -> int:
  """A tokenizer-free token count (whitespace words), for tests and scripted runs."""
  return len(text.split())


def clip(text: str, limit: int, count: Count) -> str:
  """The longest word prefix of `text` with at most `limit` tokens (binary search)."""
  if count(text) <= limit:
    return text
  parts = text.split(" ")
  lo, hi = 0, len(parts)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count(" ".join(parts[:mid]) + " ...") <= limit:
      lo = mid
    else:
      hi = mid - 1
  return " ".join(parts[:lo]) + " ..." if lo else ""


@dataclasses.dataclass(frozen=True)
class Budget:
  window: int                  # tokens of the whole working context
  core_limit: int              # tokens of all core-memory sections together
  summary_limit: int           # tokens of the recursive summary
  warning_frac: float = 0.7
  flush_frac: float = 1.0
  evict_frac: float = 0.5

  def check(self) -> "Budget":
    if not 0 < self.warning_frac < self.flush_frac <= 1 or not 0 < self.evict_frac <= 1:
      raise ValueError(f"need 0 < warning_frac < flush_frac <= 1 and 0 < evict_frac <= 1, got "
                       f"{self.warning_frac}, {self.flush_frac}, {self.evict_frac}")
    return self


def render_messages(messages: Sequence[dict]) -> str:
  return "\n".join(f"{m['role']}: {m['text']}" for m in messages)


class WorkingContext:
  """system text + core memory + summary + FIFO of messages, within `budget` (see module doc).

  `summarize(previous_summary, evicted_messages) -> str` is handed in: the model through
  `generate`, or a scripted function in tests."""

  def __init__(self, system: str, budget: Budget, recall: Store, summarize: Summarize,
               count: Count = word_count, core: dict[str, str] | None = None):
    self.system, self.budget, self.recall = system, budget.check(), recall
    self.summarize, self.count = summarize, count
    self.core: dict[str, str] = dict(core or {})
    self.summary = ""
    self.fifo: list[dict] = []   # {"role", "text", "id" (its recall record)}
    self.alerted = False
    self.evictions = 0
    room = self.count(self.render()) + budget.core_limit + budget.summary_limit
    if room > self.flush_tokens - self.max_message_tokens:
      raise ValueError(f"budget.window={budget.window} is too small: the system text, "
                       f"core_limit and summary_limit take {room} tokens; raise window or "
                       f"lower the limits")

  @property
  def flush_tokens(self) -> int:
    return int(self.budget.flush_frac * self.budget.window)

  @property
  def max_message_tokens(self) -> int:
    """The longest message kept whole in the queue (longer ones are clipped in context)."""
    return max(1, int(self.budget.evict_frac * self.budget.window) // 2)

  def render(self) -> str:
    """The prompt text the model reads."""
    core = "\n".join(f"{k}: {v}" for k, v in self.core.items())
    return (f"[system]\n{self.system}\n[core memory]\n{core}\n[summary]\n{self.summary}\n"
            f"[messages]\n{render_messages(self.fifo)}")

  def tokens(self) -> int:
    return self.count(self.render())

  def push(self, role: str, text: str) -> dict:
    """Queues a message (its full text to recall storage first), then manages the queue."""
    rid = self.recall.insert(text, {"role": role})
    msg = {"role": role, "text": clip(text, self.max_message_tokens, self.count), "id": rid}
    self.fifo.append(msg)
    self._manage()
    return msg

  def _manage(self) -> None:
    tokens = self.tokens()
    if tokens > self.budget.warning_frac * self.budget.window and not self.alerted:
      self.alerted = True
      pct = round(100 * tokens / self.budget.window)
      self.push("system", PRESSURE_ALERT.format(pct=pct))
      return
    if tokens > self.flush_tokens:
      self.flush()

  def flush(self) -> None:
    """Evicts the oldest messages (>= evict_frac x window tokens, more if the prompt is still
    over) and folds them into the recursive summary."""
    target = self.budget.evict_frac * self.budget.window
    n, freed = 0, 0
    while n < len(self.fifo) and freed < target:
      freed += self.count(render_messages(self.fifo[n:n + 1]))
      n += 1
    self._evict(n)
    while self.fifo and self.tokens() > self.flush_tokens:  # the new summary grew
      self._evict(1)
    self.alerted = False

  def _evict(self, n: int) -> None:
    """Moves the n oldest messages out of the queue, folded into the recursive summary."""
    evicted, self.fifo = self.fifo[:n], self.fifo[n:]
    if evicted:
      self.summary = clip(self.summarize(self.summary, evicted), self.budget.summary_limit,
                          self.count)
      self.evictions += len(evicted)

  # --- core memory (MemGPT's working context: read/write, always in the prompt)

  def core_append(self, section: str, content: str) -> str:
    new = (self.core.get(section, "") + " " + content).strip()
    return self._set_core(section, new)

  def core_replace(self, section: str, old: str, new: str) -> str:
    text = self.core.get(section, "")
    if not old or old not in text:
      raise ValueError(f"core memory section {section!r} does not contain {old!r}; copy the "
                       f"exact text to replace")
    return self._set_core(section, text.replace(old, new, 1))

  def _set_core(self, section: str, text: str) -> str:
    total = self.count("\n".join(f"{k}: {v}" for k, v in {**self.core, section: text}.items()))
    if total > self.budget.core_limit:
      raise ValueError(f"core memory would take {total} tokens, over core_limit="
                       f"{self.budget.core_limit}; replace or shorten a section, or move it "
                       f"to archival memory")
    self.core[section] = text
    return text

  # --- persistence (the recall store is saved by the session)

  def state(self) -> dict:
    return {"system": self.system, "core": self.core, "summary": self.summary,
            "fifo": self.fifo, "alerted": self.alerted, "evictions": self.evictions}

  def restore(self, state: dict) -> None:
    self.system, self.core = state["system"], dict(state["core"])
    self.summary, self.fifo = state["summary"], list(state["fifo"])
    self.alerted, self.evictions = state["alerted"], state["evictions"]
