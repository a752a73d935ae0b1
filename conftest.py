"""Workspace-wide pytest setup: GPU marker handling and the Triton interpreter on CPU.

`TRITON_INTERPRET=1` must be in the environment before any module that defines a Triton kernel is
imported, so it is set here, at the root, before test collection imports the packages.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # a package's isolated environment always has torch; be safe anyway
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
