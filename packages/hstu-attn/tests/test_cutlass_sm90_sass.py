"""The Hopper CUTLASS kernels compile for sm_90a with nvcc and keep their tensor-core form, on any machine.

The GPU tests of these kernels (test_cutlass_sm90_gpu.py, test_cutlass_sm90_bwd_gpu.py) run only where an H100/H200
is lent; here the four sm_90 translation units are compiled with the library's flags (csrc/CMakeLists.txt) and their
SASS is read with cuobjdump, so a change that breaks the build, turns the products into something other than wgmma
(HGMMA), loses the TMA loads (UTMALDG), drops the forward's overlap or Q-in-registers form, or makes a plain
(no relative bias) kernel spill fails in CI. Needs nvcc (CUDA 12.3+), the CUTLASS headers (the nvidia-cutlass wheel's
``cutlass_library/source/include``, or ``CUTLASS_INCLUDE_DIR``) and cuobjdump (on PATH or Triton's bundled one);
skips with the missing piece named otherwise. About a minute per unit on one core.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles four CUDA translation units

CSRC = Path(__file__).resolve().parents[1] / "csrc"
UNITS = ("fwd_sm90_hdim64.cu", "fwd_sm90_hdim128.cu", "bwd_sm90_hdim64.cu", "bwd_sm90_hdim128.cu")
KERNELS_PER_UNIT = 4  # bf16 and fp16, each with and without the fused relative bias


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.isfile(p)), None)


def _cutlass_include() -> Path | None:
    """CUTLASS_INCLUDE_DIR, else the nvidia-cutlass wheel's headers (as csrc/CMakeLists.txt finds them)."""
    candidates = [os.environ.get("CUTLASS_INCLUDE_DIR", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "source", "include"))
    return next((Path(c) for c in candidates if c and (Path(c) / "cute" / "tensor.hpp").is_file()), None)


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    bundled = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def _compile(nvcc: str, include: Path, unit: str, out: Path) -> tuple[Path, str]:
    """nvcc -c of one unit for sm_90a with the library's flags (its Release build: -O3 -DNDEBUG); the object and
    ptxas's -v report."""
    obj = out / f"{unit}.o"
    command = [
        nvcc, "-c", str(CSRC / unit), "-o", str(obj), "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17",
        "--expt-relaxed-constexpr", "-O3", "-DNDEBUG", "-Xptxas=-v", "-I", str(CSRC), "-I", str(include),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"nvcc failed on {unit}:\n{result.stderr[-4000:]}"
    return obj, result.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """unit -> (object file, ptxas report), compiled two at a time."""
    nvcc, include, cuobjdump = _nvcc(), _cutlass_include(), _cuobjdump()
    tools = {"nvcc": nvcc, "CUTLASS headers": include, "cuobjdump": cuobjdump}
    missing = [name for name, found in tools.items() if not found]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (nvidia-cutlass wheel or CUTLASS_INCLUDE_DIR for the headers)")
    out = tmp_path_factory.mktemp("sm90")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {unit: pool.submit(_compile, nvcc, include, unit, out) for unit in UNITS}
        return {unit: future.result() for unit, future in futures.items()}


def _sass_by_kernel(obj: Path) -> dict[str, str]:
    """Mangled kernel name -> its sm_90a SASS text."""
    text = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _spills(report: str) -> dict[str, int]:
    """Mangled kernel name -> spill store bytes, from ptxas -v (entries compiled for sm_90a)."""
    spills, entry = {}, None
    for line in report.splitlines():
        if match := re.search(r"Compiling entry function '(\S+)' for 'sm_90a'", line):
            entry = match.group(1)
        elif entry and (match := re.search(r"(\d+) bytes spill stores", line)):
            spills[entry] = int(match.group(1))
            entry = None
    return spills


@pytest.mark.parametrize("unit", UNITS)
def test_every_hopper_kernel_uses_wgmma_and_tma(builds: dict[str, tuple[Path, str]], unit: str) -> None:
    kernels = {name: sass for name, sass in _sass_by_kernel(builds[unit][0]).items() if "sm90_kernel" in name}
    assert len(kernels) == KERNELS_PER_UNIT, sorted(kernels)
    for name, sass in kernels.items():
        assert sass.count("HGMMA") >= 8, f"{name}: the products are not wgmma"
        assert "UTMALDG" in sass, f"{name}: no TMA load"


@pytest.mark.parametrize("unit", [u for u in UNITS if u.startswith("fwd")])
def test_forward_overlaps_and_holds_q_in_registers(builds: dict[str, tuple[Path, str]], unit: str) -> None:
    """The forward waits for S alone while P V runs (wait_group 1) and loads Q with ldmatrix for its RS Q K^T."""
    for name, sass in _sass_by_kernel(builds[unit][0]).items():
        if "sm90_kernel" in name:
            assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass, f"{name}: S and P V no longer overlap"
            assert "LDSM" in sass, f"{name}: Q is no longer loaded into registers"


@pytest.mark.parametrize("unit", UNITS)
def test_plain_kernels_do_not_spill(builds: dict[str, tuple[Path, str]], unit: str) -> None:
    """No spills without the relative bias (the backward's relative head-dim-128 instantiation spills; tolerated)."""
    spills = {name: n for name, n in _spills(builds[unit][1]).items() if "sm90_kernel" in name}
    assert len(spills) == KERNELS_PER_UNIT, spills
    plain = {name: n for name, n in spills.items() if "Lb0E" in name}  # the kRelative = false template argument
    assert len(plain) == KERNELS_PER_UNIT // 2, sorted(spills)
    assert all(n == 0 for n in plain.values()), plain
    if unit.startswith("fwd"):
        assert all(n == 0 for n in spills.values()), spills
