"""Logging of the command-line tools: one handler on stdout, `--log-level` for gr_models, dependencies' repeated
messages shown once, and only rank 0 of a `torchrun` world showing anything below ERROR."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["LOG_LEVELS", "OncePerMessage", "configure_logging", "is_main_process", "remove_logging"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_OWN = "gr_models"
_HANDLER_NAME = "gr_models.cli"
# loggers with their own handlers that do not propagate to the root (torch formats its records itself)
_DEPENDENCY_LOGGERS = ("torch", "torchrec", "fbgemm_gpu", "megatron")


class _CurrentStdout(logging.StreamHandler):
    """A handler writing to whatever `sys.stdout` is when a record is emitted (so a replaced or captured stdout, as
    under pytest, never leaves it writing to a closed stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class OncePerMessage(logging.Filter):
    """Drops a record of another package whose logger, level and message were already let through (fbgemm's and
    torch.fx's warnings, repeated per call or per module); gr_models' own records always pass."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _OWN or record.name.startswith(_OWN + "."):
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a `torchrun` world (read from the RANK environment variable)."""
    return int(os.environ.get("RANK", "0")) == 0


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None, main: bool | None = None) -> None:
    """Log to `stream` (default: the current `sys.stdout` at each record) as `HH:MM:SS LEVEL message`.

    gr_models' loggers log at `level`; other packages at WARNING (everything at DEBUG), each distinct message once
    (Python warnings included, through `logging.captureWarnings`). On ranks other than the main one only errors
    are shown. The root logger's plain console handlers (ours from an earlier call, or a dependency's
    `logging.basicConfig`) are replaced by this one.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    main = is_main_process() if main is None else main
    numeric = getattr(logging, level) if main else logging.ERROR
    root = logging.getLogger()
    # ours from an earlier call, and console handlers that imported packages installed with logging.basicConfig
    # (fbgemm_gpu's TBE utilities do at import, at DEBUG level)
    replaced = (logging.StreamHandler, _CurrentStdout)
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME or type(h) in replaced]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStdout()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    once = OncePerMessage()
    handler.addFilter(once)
    root.addHandler(handler)
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    logging.getLogger(_OWN).setLevel(numeric)
    logging.captureWarnings(True)
    for name in _DEPENDENCY_LOGGERS:
        logger = logging.getLogger(name)
        if not main:
            logger.setLevel(logging.ERROR)
        for own_handler in logger.handlers:
            for previous in [f for f in own_handler.filters if isinstance(f, OncePerMessage)]:
                own_handler.removeFilter(previous)
            own_handler.addFilter(once)


def remove_logging() -> None:
    """Undo `configure_logging`: remove its handler and stop routing Python warnings through logging."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    logging.captureWarnings(False)
