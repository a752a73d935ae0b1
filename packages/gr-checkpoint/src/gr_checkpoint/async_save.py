"""Asynchronous saves: snapshot now, write in a background thread, publish when complete.

``save(..., asynchronous=True)`` blocks only while it copies what it saves to host memory (the
dense and optimizer state with torch's own CPU staging helpers, the dynamic tables as dynamicemb
``TableSnapshot`` objects (see :mod:`gr_checkpoint.table_snapshots`), the extra state); a
background thread then writes every file into the staging folder, checksums them, writes the
manifest and renames the folder into place, as a synchronous save does. The snapshot costs as
much host memory as the state saved.

One save at a time per process: any save (and any load) first waits for the pending one, and
raises its error if nobody has seen it yet. The background threads of all ranks run their
collectives over a process group of their own (gloo, created by the first asynchronous save),
so they never interleave with the training's. Call :func:`wait_for_saves` (or the handle's
``wait()``) before destroying the process group or exiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

try:
    import numpy as np
except ImportError:  # numpy is optional: without it, no value can be a numpy one
    np = None  # type: ignore[assignment]

__all__ = [
    "SaveHandle",
    "checkpoint_group",
    "snapshot_state",
    "snapshot_value",
    "start_background_save",
    "wait_for_saves",
]

_pending: SaveHandle | None = None
_group: dist.ProcessGroup | None = None


class SaveHandle:
    """A checkpoint being written in the background (returned by ``save(..., asynchronous=True)``)."""

    def __init__(self, path: Path, work: Callable[[], None]) -> None:
        self.path = path
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"gr-checkpoint save {path}")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to wait()
            self._error = error

    def done(self) -> bool:
        """Whether the background write has finished (successfully or not)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the checkpoint is published and return its path; raise what the background
        write raised (the checkpoint is then not published), or ``TimeoutError`` after ``timeout`` s."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the checkpoint {self.path} is still being written after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        return self.path


def wait_for_saves() -> None:
    """Wait for this process's pending asynchronous save; raise its error unless ``wait()`` already did."""
    global _pending
    pending, _pending = _pending, None
    if pending is None:
        return
    pending._thread.join()
    if pending._error is not None and not pending._reported:
        pending._reported = True
        raise RuntimeError(f"the asynchronous save of {pending.path} failed") from pending._error


def start_background_save(path: Path, work: Callable[[], None]) -> SaveHandle:
    """Run ``work`` in a background thread; the next save or load waits for it."""
    global _pending
    handle = SaveHandle(path, work)
    _pending = handle
    return handle


def checkpoint_group() -> dist.ProcessGroup | None:
    """The process group of background saves (a gloo group over all ranks, created on first use:
    collective); ``None`` without ``torch.distributed``."""
    global _group
    if not dist.is_initialized():
        return None
    if _group is None:
        _group = dist.new_group(backend="gloo")
    return _group


def snapshot_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy in host memory of a state dict (plain, DTensor and ShardedTensor values alike)."""
    copy = _create_cpu_state_dict(state)
    return _copy_state_dict(state, copy, type_check=False)


def snapshot_value(value: Any) -> Any:
    """``value`` with every tensor and NumPy array copied (for the extra state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if np is not None and isinstance(value, np.ndarray):
        return value.copy()
    if type(value) in (list, tuple):
        return type(value)(snapshot_value(item) for item in value)
    if type(value) is dict:
        return {key: snapshot_value(item) for key, item in value.items()}
    return value
