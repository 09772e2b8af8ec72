"""MemGPT's processor loop (Packer et al. 2023, Sec. 2.3-2.4): an event (a user message, a system
alert) is queued, the model reads the working context and answers with one function call;
the call's result is queued; if the call asked for a heartbeat (or failed) the model runs
again at once, else the loop yields until the next event.

  agent = Agent(policy, session)          # policy(prompt: str) -> the model's output text
  replies = agent.handle("My name is Ada.")   # the send_message texts of this event

The policy is the model (e.g. `generate` over the rendered prompt) or a scripted stand-in in
tests; `max_chain` bounds the calls one event may chain.
"""
from __future__ import annotations

from typing import Callable

from ctxjax.agent import functions
from ctxjax.agent.session import Session

Policy = Callable[[str], str]


class Agent:
  def __init__(self, policy: Policy, session: Session, *, page_size: int = 5,
               max_chain: int = 8):
    if max_chain < 1 or page_size < 1:
      raise ValueError(f"max_chain={max_chain} and page_size={page_size} must be >= 1")
    self.policy, self.session = policy, session
    self.page_size, self.max_chain = page_size, max_chain
    self.outbox: list[str] = []
    self.steps = 0

  @property
  def context(self):
    return self.session.context

  @property
  def archival(self):
    return self.session.archival

  def step(self) -> bool:
    """One processor run: prompt -> output -> call -> result queued; -> heartbeat."""
    output = self.policy(self.context.render())
    self.steps += 1
    self.context.push("assistant", output)
    result, heartbeat = functions.execute(self, output)
    self.context.push("function", result)
    return heartbeat

  def handle(self, text: str, role: str = "user") -> list[str]:
    """Queues an event and runs the processor until it yields; saves the session."""
    start = len(self.outbox)
    self.context.push(role, text)
    for _ in range(self.max_chain):
      if not self.step():
        break
    self.session.save()
    return self.outbox[start:]
