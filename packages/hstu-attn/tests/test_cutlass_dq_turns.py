"""The turn order of the CUTLASS backward's deterministic dQ (`csrc/dq_turns.cuh`), on the CPU: nvcc compiles
`csrc/dq_turns_check.cu` as host code against the header the kernel includes, and the program checks, for every
sequence length up to about 1100, the backward's block sizes and a causal start or not, that each CTA's turn at a query
block equals the number of higher key blocks visiting it, and that a simulated launch (key blocks from the last, 1-3
CTAs resident) never deadlocks and leaves every counter at its visitor count. Skips without nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.isfile(p)), None)


def test_deterministic_dq_turn_order(tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (host compile of csrc/dq_turns_check.cu)")
    program = tmp_path / "dq_turns_check"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-O2", str(CSRC / "dq_turns_check.cu"), "-o", str(program)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-3000:]}"
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", f"turn order broken: {run.stdout}{run.stderr}"
