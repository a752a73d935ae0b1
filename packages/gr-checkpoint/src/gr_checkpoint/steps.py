"""Checkpoints kept as ``<root>/step_<n>``: save one per step, find the newest to resume from."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gr_checkpoint.atomic import run_on_rank_zero
from gr_checkpoint.checkpoint import save
from gr_checkpoint.errors import CheckpointCorruptError
from gr_checkpoint.manifest import read_manifest

__all__ = ["checkpoint_path", "latest_checkpoint", "save_step"]

_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_path(root: str | os.PathLike[str], step: int) -> Path:
    """``root/step_<step>``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return Path(root) / f"step_{step}"


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_<n>`` directory under ``root`` with a readable manifest, by step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        if entry.is_symlink():
            warnings.warn(f"skipping {entry}: a symbolic link (load it by passing its path)", stacklevel=3)
            continue
        try:
            read_manifest(entry)
        except FileNotFoundError:
            continue
        except CheckpointCorruptError as error:
            warnings.warn(f"skipping unreadable checkpoint: {error}", stacklevel=3)
            continue
        found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The ``root/step_<n>`` with the largest ``n`` that is complete (its manifest reads), or ``None``.

    Staging directories of unfinished saves are never returned; a checkpoint whose manifest is
    corrupt is skipped with a warning.
    """
    complete = _complete_steps(Path(root))
    return complete[-1][1] if complete else None


def save_step(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    keep_last: int | None = None,
) -> Path:
    """:func:`~gr_checkpoint.save` to ``root/step_<step>``; then, with ``keep_last``, delete all but
    the ``keep_last`` complete step checkpoints with the largest steps. Collective. Returns the new
    checkpoint's path."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    path = save(checkpoint_path(root, step), model, optimizer, extra_state=extra_state, step=step)
    if keep_last is not None:

        def prune() -> None:
            for _, old in _complete_steps(Path(root))[:-keep_last]:
                shutil.rmtree(old)

        run_on_rank_zero(prune)
    return path
