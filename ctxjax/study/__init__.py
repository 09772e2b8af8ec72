"""The context-extension study: `python -m ctxjax.study` (plan, scheduler, item workers,
findings, report)."""
