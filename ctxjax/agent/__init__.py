"""Memory above the model: a MemGPT-style context manager (Packer et al. 2023) and
Think-in-Memory (Liu et al. 2023) over ctxjax generation. See docs/agent.md.

  context.py    working context, token budget, warning / flush with recursive summary
  store.py      recall and archival stores: text and embedding search, paginated
  functions.py  the function calls parsed from the model's JSON output
  agent.py      the processor loop (heartbeats, yields)
  session.py    the stores in a workdir (persist.py: atomic JSONL + .npy)
  embed.py      mean-pooled final hidden states of a ctxjax model as embeddings
  lsh.py, thoughts.py, tim.py   Think-in-Memory
  model_policy.py  a ctxjax model as the policy and summariser (through `generate`)
  passkey.py    the real-model command: a passkey document 8x the window, paged
"""
from ctxjax.agent.agent import Agent  # noqa: F401
from ctxjax.agent.context import Budget, WorkingContext, word_count  # noqa: F401
from ctxjax.agent.session import Session  # noqa: F401
from ctxjax.agent.store import Store  # noqa: F401
from ctxjax.agent.thoughts import ThoughtMemory  # noqa: F401
