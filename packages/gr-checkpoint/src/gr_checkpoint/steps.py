"""Checkpoints kept as ``<root>/step_<n>``: save one per step, find the newest to resume from.

A save in progress lives in ``<root>/.step_<n>.incomplete`` and a pruned checkpoint is first
renamed to ``<root>/.step_<n>.deleting``: neither name is ever taken for a checkpoint, so a
process killed while saving or pruning leaves nothing that :func:`latest_checkpoint` returns.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gr_checkpoint.async_save import SaveHandle
from gr_checkpoint.checkpoint import save
from gr_checkpoint.errors import CheckpointCorruptError
from gr_checkpoint.integrity import verify_files
from gr_checkpoint.manifest import Manifest, read_manifest

__all__ = ["checkpoint_path", "latest_checkpoint", "save_step"]

_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER_DIR = re.compile(r"\.step_(\d+)\.(incomplete|deleting)")


def checkpoint_path(root: str | os.PathLike[str], step: int) -> Path:
    """``root/step_<step>``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return Path(root) / f"step_{step}"


def _check_files(entry: Path, manifest: Manifest, verify: bool) -> None:
    """Every file the manifest lists is there with its size (and, with ``verify``, its CRC32)."""
    if manifest.files is None:
        return
    if verify:
        verify_files(entry, manifest.files, sorted(manifest.files))
        return
    for name, record in manifest.files.items():
        path = entry / name
        size = path.stat().st_size if path.is_file() else None
        if size != record.size:
            raise CheckpointCorruptError(path, f"{size} bytes (or missing), the manifest says {record.size}")


def _complete_steps(root: Path, verify: bool = False) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``step_<n>`` directory under ``root``, by step."""
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
            _check_files(entry, read_manifest(entry), verify)
        except FileNotFoundError:
            continue
        except CheckpointCorruptError as error:
            warnings.warn(f"skipping unreadable checkpoint: {error}", stacklevel=3)
            continue
        found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str], *, verify: bool = False) -> Path | None:
    """The ``root/step_<n>`` with the largest ``n`` that is complete, or ``None``.

    Complete: its manifest reads and every file it lists is present with the listed size (with
    ``verify``, also the listed CRC32, which reads every file). Staging directories of unfinished
    saves and checkpoints being pruned are never returned; an incomplete or damaged checkpoint is
    skipped with a warning naming the file.
    """
    complete = _complete_steps(Path(root), verify)
    return complete[-1][1] if complete else None


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (renamed first, so a kill mid-way
    leaves only a hidden folder) and the leftovers of killed saves of steps before ``current``."""
    for step, old in _complete_steps(root)[:-keep_last]:
        doomed = root / f".step_{step}.deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    for entry in root.iterdir():
        match = _LEFTOVER_DIR.fullmatch(entry.name)
        if match is not None and int(match.group(1)) < current and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def save_step(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    keep_last: int | None = None,
    asynchronous: bool = False,
) -> Path | SaveHandle:
    """:func:`~gr_checkpoint.save` to ``root/step_<step>``; then, with ``keep_last``, delete all but
    the ``keep_last`` complete step checkpoints with the largest steps, and what killed saves of
    earlier steps left behind. Collective. Returns the new checkpoint's path, or with
    ``asynchronous=True`` a :class:`~gr_checkpoint.SaveHandle` (pruning then follows in the background,
    once the new checkpoint is published)."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    prune = None if keep_last is None else lambda: _prune(Path(root), keep_last, step)
    target = checkpoint_path(root, step)
    if asynchronous:
        return save(target, model, optimizer, extra_state=extra_state, step=step, asynchronous=True, on_published=prune)
    return save(target, model, optimizer, extra_state=extra_state, step=step, on_published=prune)
