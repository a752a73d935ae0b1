"""hstu-attn tests: this folder on `sys.path`, so a test file imports a sibling's helpers by name
(`import test_cutlass_gpu as _base`); under pytest's `--import-mode=importlib` the folder is not a package."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
