"""How the pack's errors reach the user: a quoted cause as a clause of the pack's own sentence, and the
nodes' errors without the pack's frames.

ComfyUI 0.20.1 logs ``traceback.format_exc()`` for every exception a node raises and sends its frames
with the error (``execution.py``, ``execute``); no exception type is exempt. A node can only keep what
it raises short: ``user_facing`` re-raises the pack's own messages (they start with the node's name and
say what to do) with no frames below the node's ``execute`` and no chained cause, so the log and the
error dialog show the message and ComfyUI's own few frames. Checks that need no cluster, model or
latent run at queue time instead (``validate_inputs``): a refused prompt there has no traceback at all.
"""
from __future__ import annotations

import functools

import torch


def clause(e: BaseException, limit: int = 400) -> str:
    """An exception as a clause inside a sentence: its type and first line, without a closing period
    (a quoted "... video." followed by the pack's ". The workers ..." would read "video.. The")."""
    text = str(e).strip()
    text = text.splitlines()[0][:limit].rstrip(". ") if text else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def user_facing(prefixes: tuple[str, ...]):
    """Decorate a node's ``execute``: an error of the pack (a ValueError, RuntimeError or out-of-memory
    error whose message starts with one of ``prefixes``, the node names) is raised again from ``execute``
    with its own frames and chained cause dropped; the type is kept (ComfyUI frees its models on an
    out-of-memory error). Anything else, ComfyUI's Interrupt included, passes unchanged."""

    def wrap(fn):
        @functools.wraps(fn)
        def execute(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, RuntimeError, torch.OutOfMemoryError) as e:
                if not str(e).startswith(prefixes):
                    raise
                e.__cause__ = None  # the message says it all; ComfyUI's log shows ComfyUI's frames only
                raise e.with_traceback(None) from None

        return execute

    return wrap


def one_line(e: BaseException) -> str:
    """An exception as one short line (what a worker reports to the driver): its type and the first line of
    its message."""
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}"
