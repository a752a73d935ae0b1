"""Publishing a checkpoint directory atomically, and rank-0 file operations inside collectives.

A checkpoint ``<parent>/<name>`` is written into the staging directory ``<parent>/.<name>.incomplete``;
only when everything (manifest last) is on disk does rank 0 move it into place. Replacing an
existing checkpoint takes two renames: the old one to ``<parent>/.<name>.previous``, the staging
directory to ``<name>``; then the old one is deleted. A crash at any point leaves either the old
or the new checkpoint complete under one of those names, and :func:`resolve_checkpoint_dir`
finds it. Nothing whose manifest is missing is ever loaded.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from dynamicemb.dump import fsync_folder
from gr_checkpoint.collective import broadcast_from_zero, rank_and_world
from gr_checkpoint.manifest import MANIFEST_NAME

__all__ = [
    "discard_staging",
    "prepare_staging",
    "publish",
    "resolve_checkpoint_dir",
    "run_on_rank_zero",
    "staging_dir",
]


def run_on_rank_zero(action: Callable[[], None], group: dist.ProcessGroup | None = None) -> None:
    """Run ``action`` on rank 0 of ``group``; every rank returns after it, or raises if it failed (collective)."""
    rank, world = rank_and_world(group)
    failure: BaseException | None = None
    if rank == 0:
        try:
            action()
        except Exception as error:
            failure = error
    if world > 1:
        message = broadcast_from_zero(None if failure is None else f"{type(failure).__name__}: {failure}", group)
        if failure is None and message is not None:
            raise RuntimeError(f"rank 0 failed while writing the checkpoint: {message}")
    if failure is not None:
        raise failure


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.incomplete"


def _previous_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def prepare_staging(target: Path) -> None:
    """Create an empty staging directory for ``target`` (removing one a crashed save left).

    ``target`` may be absent, an empty directory or a previous checkpoint; anything else is
    refused rather than replaced.
    """
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / MANIFEST_NAME).exists())):
        raise FileExistsError(f"{target} exists and is not a checkpoint (no {MANIFEST_NAME}); refusing to replace it")
    staging = staging_dir(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


def discard_staging(target: Path) -> None:
    shutil.rmtree(staging_dir(target), ignore_errors=True)


def publish(target: Path) -> None:
    """Move the finished staging directory to ``target``, replacing a previous checkpoint there."""
    staging, previous = staging_dir(target), _previous_dir(target)
    if not (staging / MANIFEST_NAME).is_file():
        raise RuntimeError(f"{staging} has no {MANIFEST_NAME}; refusing to publish an incomplete checkpoint")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    fsync_folder(target.parent)
    if previous.exists():
        shutil.rmtree(previous)


def resolve_checkpoint_dir(path: Path) -> Path:
    """``path`` if it holds a manifest; else the previous checkpoint a save interrupted between its
    two renames left at ``.<name>.previous`` (with a warning); else ``path`` (the caller reports it)."""
    if (path / MANIFEST_NAME).is_file():
        return path
    previous = _previous_dir(path)
    if (previous / MANIFEST_NAME).is_file() and not previous.is_symlink():
        warnings.warn(
            f"{path} is missing or incomplete; loading {previous}, the checkpoint an interrupted save was replacing",
            stacklevel=3,
        )
        return previous
    return path
