"""The workers' log lines in ComfyUI's log. A Ray worker's root logger lets only warnings through (to its
stderr, which Ray echoes with its own prefix), so the pack's INFO lines there (the FFN chunking, the memory
lines) were lost. Each worker keeps the records of the pack's loggers (INFO and above) in a buffer instead;
the driver takes them with every heartbeat and at the end of each wait, and logs them again under the same
logger names, prefixed ``[RayWorker r]``: they pass through ComfyUI's own log handlers like its own lines."""
from __future__ import annotations

import collections
import logging

LIMIT = 2000  # lines a worker keeps between two polls (the oldest go first)


class WorkerLogs(logging.Handler):
    """A worker's buffer of the pack's log records (``package``: the pack's logger name there)."""

    def __init__(self, package: str):
        super().__init__(logging.INFO)
        self.lines: collections.deque = collections.deque(maxlen=LIMIT)
        logger = logging.getLogger(package)
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        logger.propagate = False  # not also to the worker's stderr: the driver logs them once

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.name, record.getMessage()))

    def take(self) -> list[tuple[int, str, str]]:
        """The lines since the last call, oldest first: (level, logger name, message)."""
        out = []
        while self.lines:
            out.append(self.lines.popleft())
        return out


def replay(rank: int, lines) -> None:
    """Log a worker's ``lines`` in this process, each prefixed ``[RayWorker rank]`` (once)."""
    prefix = f"[RayWorker {rank}]"
    for level, name, message in lines:
        logging.getLogger(name).log(level, "%s", message if message.startswith(prefix) else f"{prefix} {message}")
