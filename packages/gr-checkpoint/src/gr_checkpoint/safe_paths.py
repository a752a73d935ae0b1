"""Names read from checkpoint files never reach outside the checkpoint folder.

A checkpoint folder the user passed is trusted as a location (it may itself be a symbolic link);
everything found inside it is not: a file or folder name read from a manifest must be a plain
name (no path separator, not ``.``/``..``, not absolute), and no entry of the folder may resolve,
through symbolic links, to a place outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from gr_checkpoint.errors import UnsafeCheckpointError

__all__ = ["check_no_escaping_links", "check_plain_name", "resolved_inside"]


def check_plain_name(name: object, source: object) -> str:
    """``name`` if it is a plain file name; else :class:`UnsafeCheckpointError` naming ``source`` and ``name``."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise UnsafeCheckpointError(source, f"names {name!r}, which is not a plain file name inside the checkpoint")
    return name


def resolved_inside(root: Path, path: Path, source: object, name: str) -> Path:
    """``path`` if it resolves (following symbolic links) to ``root`` or below; else :class:`UnsafeCheckpointError`."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafeCheckpointError(source, f"{name!r} resolves to {real}, outside the checkpoint folder {real_root}")
    return path


def check_no_escaping_links(root: Path) -> None:
    """Raise :class:`UnsafeCheckpointError` naming the first symbolic link under ``root`` that resolves outside it."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in sorted(dirs + files):
            path = Path(folder) / entry
            if path.is_symlink():
                resolved_inside(root, path, path, entry)
