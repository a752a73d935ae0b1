"""Converting a trusted format-1 checkpoint (pickled extra state) to format 2 (extra state as data).

Format-1 checkpoints kept the extra state as a pickle inside ``torch_module/``; loading one could
run code, so :func:`gr_checkpoint.load` refuses them. A user who trusts one converts it once::

    gr-checkpoint convert --trust PATH          # or: python -m gr_checkpoint convert --trust PATH
    gr_checkpoint.convert_trusted_checkpoint(PATH, trust=True)

This unpickles the old extra state (the one step that can run code, hence ``--trust``), checks
that it is data (else :class:`~gr_checkpoint.UnsafeExtraStateError` names the key and type),
writes ``extra_state.pt`` and a current manifest (with the checksums of every file) into a copy
and swaps it in atomically. A format-2 checkpoint (no checksums) gets its checksums the same way;
nothing is unpickled for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from gr_checkpoint.atomic import publish, staging_dir
from gr_checkpoint.checkpoint import TORCH_FOLDER
from gr_checkpoint.extra_state import write_extra_state
from gr_checkpoint.integrity import list_checkpoint_files, record_files
from gr_checkpoint.manifest import FORMAT_VERSION, read_manifest

__all__ = ["convert_trusted_checkpoint", "main"]

_LEGACY_EXTRA_STATE_KEY = "extra_state"


def _unpickle_legacy_extra_state(torch_folder: Path) -> Any:
    """The format-1 extra state: DCP stored a ``BytesIO`` holding ``torch.save(extra_state)``. Runs pickles."""
    state: dict[str, Any] = {_LEGACY_EXTRA_STATE_KEY: io.BytesIO()}
    dcp.load(state, storage_reader=FileSystemReader(torch_folder), planner=DefaultLoadPlanner(), no_dist=True)
    serialized = state[_LEGACY_EXTRA_STATE_KEY]
    serialized.seek(0)
    return torch.load(serialized, weights_only=False)


def convert_trusted_checkpoint(path: str | os.PathLike[str], *, trust: bool = False) -> bool:
    """Rewrite the format-1 or format-2 checkpoint at ``path`` in the current format (with checksums);
    ``True`` if converted, ``False`` if it already was current. ``trust=True`` is required: converting
    a format-1 checkpoint unpickles the old extra state, which runs any code it holds. Single process."""
    if not trust:
        raise PermissionError(
            "converting unpickles the checkpoint's extra state, which runs any code it holds; "
            "pass trust=True (--trust) only for a checkpoint you trust"
        )
    target = Path(path)
    manifest = read_manifest(target)
    if manifest.format_version == FORMAT_VERSION:
        return False
    staging = staging_dir(target)
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(target, staging, symlinks=True)
    try:
        if manifest.format_version == 1 and manifest.has_extra_state:
            write_extra_state(staging, _unpickle_legacy_extra_state(staging / TORCH_FOLDER))
        files = record_files(staging, list_checkpoint_files(staging))
        dataclasses.replace(manifest, format_version=FORMAT_VERSION, files=files).write(staging)
        publish(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    """``gr-checkpoint convert --trust PATH``."""
    parser = argparse.ArgumentParser(prog="gr-checkpoint", description="gr-checkpoint maintenance commands")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help=f"convert a trusted format-1 or format-2 checkpoint to format {FORMAT_VERSION}"
    )
    convert.add_argument("path", help="checkpoint directory (the one holding manifest.json)")
    convert.add_argument(
        "--trust", action="store_true", help="required: converting unpickles the old extra state, running its code"
    )
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error("convert unpickles the checkpoint's extra state, which can run code: add --trust if you trust it")
    converted = convert_trusted_checkpoint(args.path, trust=True)
    print(f"{args.path}: {'converted to' if converted else 'already'} format {FORMAT_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
