"""The functions the model acts through, parsed from its output as one JSON object
(MemGPT: Packer et al. 2023, Sec. 2.3; the names follow the issue):

  {"function": "archival_search", "arguments": {"query": "pass key", "page": 0,
                                                "request_heartbeat": true}}

  send_message(message)                         the only way to talk to the user
  core_memory_append(section, content)          pinned memory, always in the prompt
  core_memory_replace(section, old_content, new_content)
  archival_insert(content)                      a document into archival storage
  archival_search(query, page=0, mode=None)     paginated; mode "embedding" (the default when
                                                the store has an embedding function),
                                                "embedding_centered" or "text"
  recall_search(query, page=0, mode="text")     the whole conversation, paginated

Every function takes `request_heartbeat` (default false): true asks the processor to run again
right after the result is queued (chained calls); otherwise it yields until the next event.
A malformed call (not JSON, unknown function, missing or unknown argument, a failing edit)
returns one line starting "error:" naming the problem and the expected form; as in MemGPT, a
failed call requests a heartbeat itself so the model can correct it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable

from ctxjax.registry import Registry, unknown_choice

FUNCTIONS: Registry[Callable[..., Any]] = Registry("function")
CALL_FORM = '{"function": NAME, "arguments": {...}}'


class CallError(ValueError):
  """A call the processor cannot run; its message goes back to the model."""


@dataclasses.dataclass(frozen=True)
class Call:
  name: str
  args: dict
  heartbeat: bool


@FUNCTIONS.register("send_message")
def send_message(agent, message: str):
  agent.outbox.append(str(message))
  return "sent"


@FUNCTIONS.register("core_memory_append")
def core_memory_append(agent, section: str, content: str):
  return {section: agent.context.core_append(section, str(content))}


@FUNCTIONS.register("core_memory_replace")
def core_memory_replace(agent, section: str, old_content: str, new_content: str):
  return {section: agent.context.core_replace(section, str(old_content), str(new_content))}


@FUNCTIONS.register("archival_insert")
def archival_insert(agent, content: str):
  return {"id": agent.archival.insert(str(content))}


@FUNCTIONS.register("archival_search")
def archival_search(agent, query: str, page: int = 0, mode: str | None = None):
  mode = mode or ("embedding" if agent.archival.embed is not None else "text")
  return agent.archival.search(str(query), mode=mode, page=int(page),
                               page_size=agent.page_size)


@FUNCTIONS.register("recall_search")
def recall_search(agent, query: str, page: int = 0, mode: str = "text"):
  return agent.context.recall.search(str(query), mode=mode, page=int(page),
                                     page_size=agent.page_size)


def describe() -> str:
  """One line per function (its arguments), for the system text."""
  lines = []
  for name, fn in FUNCTIONS.items():
    params = list(inspect.signature(fn).parameters.values())[1:]
    args = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}="
                     f"{p.default!r}" for p in params)
    lines.append(f"{name}({args}, request_heartbeat=False)")
  return f"Answer with one JSON object {CALL_FORM}. Functions:\n" + "\n".join(lines)


def parse_call(text: str) -> Call:
  """The call in the model's output (the first '{' to the last '}'), checked against the
  function's signature; raises CallError with the one line to feed back."""
  start, end = text.find("{"), text.rfind("}")
  if start < 0:
    raise CallError(f"no JSON object in the output; answer with {CALL_FORM}")
  try:
    obj = json.loads(text[start:end + 1] if end > start else text[start:])
  except json.JSONDecodeError as err:
    raise CallError(f"malformed JSON ({err.msg} at char {err.pos}); answer with "
                    f"{CALL_FORM}") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("function"), str):
    raise CallError(f"the object has no string 'function'; answer with {CALL_FORM}")
  name, args = obj["function"], obj.get("arguments", {})
  if name not in FUNCTIONS:
    raise CallError(unknown_choice("function", name, FUNCTIONS))
  if not isinstance(args, dict):
    raise CallError(f"{name}: 'arguments' must be an object, got {type(args).__name__}")
  args = dict(args)
  heartbeat = args.pop("request_heartbeat", False)
  params = list(inspect.signature(FUNCTIONS[name]).parameters.values())[1:]
  known = {p.name for p in params}
  unknown = sorted(set(args) - known)
  missing = [p.name for p in params if p.default is inspect.Parameter.empty
             and p.name not in args]
  if unknown or missing:
    raise CallError(f"{name}: " + "; ".join(
        ([f"unknown arguments {unknown}"] if unknown else []) +
        ([f"missing arguments {missing}"] if missing else [])) +
        f"; its arguments are {sorted(known) + ['request_heartbeat']}")
  return Call(name, args, bool(heartbeat))


def execute(agent, text: str) -> tuple[str, bool]:
  """Runs the call in `text` -> (the result line for the queue, heartbeat requested)."""
  try:
    call = parse_call(text)
    result = FUNCTIONS[call.name](agent, **call.args)
  except (CallError, ValueError, TypeError) as err:
    return f"error: {err}", True
  return json.dumps({"function": call.name, "result": result}, ensure_ascii=False), \
      call.heartbeat
