"""Loading an export never runs code from its files (issue: safe loading).

`torch.export.load` retries a failed weights-only read of the archive's sample inputs with
`torch.load(weights_only=False)`, and unpickles weights marked as pickled in the archive's JSON: a crafted
`program.pt2` runs code on plain `torch.export.load` (checked below, so the test fails if torch stops doing so
and the guard becomes untested). `gr_models.export.loader.load_program` reads it with every unpickler limited to
tensors; each crafted archive is loaded in a fresh process, which must fail without creating the payload's marker.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does: call a function of their choice on load
        return (Path.touch, (self.marker,))


def _program(path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.export.save(torch.export.export(module, (torch.randn(4, 3),)), path)


def _rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    """Copy the zip archive `source` to `target`, the members whose names end with a key replaced."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            new = next((data for suffix, data in replace.items() if info.filename.endswith(suffix)), None)
            dst.writestr(info, src.read(info.filename) if new is None else new)


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _crafted(tmp_path: Path, kind: str, marker: Path) -> Path:
    clean = tmp_path / "clean.pt2"
    _program(clean)
    crafted = tmp_path / f"{kind}.pt2"
    if kind == "sample_inputs":  # read through torch.load(weights_only=True), then the weights_only=False fallback
        _rewrite(clean, crafted, {"data/sample_inputs/model.pt": _pickled((_Payload(marker),))})
    else:  # a weight the archive's JSON marks as pickled: read with torch.load(weights_only=False)
        with zipfile.ZipFile(clean) as archive:
            name = next(n for n in archive.namelist() if n.endswith("weights/model_weights_config.json"))
            config = json.loads(archive.read(name))
        fqn = next(iter(config["config"]))
        config["config"][fqn]["use_pickle"] = True
        weight_file = config["config"][fqn]["path_name"]
        _rewrite(
            clean, crafted, {name: json.dumps(config).encode(), f"weights/{weight_file}": _pickled(_Payload(marker))}
        )
    return crafted


def _load_in_fresh_process(loader: str, program: Path) -> subprocess.CompletedProcess[str]:
    code = f"import sys, torch; from gr_models.export.loader import load_program; {loader}({str(program)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["sample_inputs", "pickled_weight"])
def test_crafted_program_fails_without_running_its_payload(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "payload-ran"
    crafted = _crafted(tmp_path, kind, marker)

    unguarded = _load_in_fresh_process("torch.export.load", crafted)
    assert marker.exists(), f"plain torch.export.load no longer runs the {kind} payload: {unguarded.stderr[-2000:]}"
    marker.unlink()

    guarded = _load_in_fresh_process("load_program", crafted)
    assert guarded.returncode != 0
    assert "UnsafeExportError" in guarded.stderr or "UnpicklingError" in guarded.stderr, guarded.stderr[-3000:]
    assert not marker.exists()


def test_clean_program_loads_and_computes_as_saved(tmp_path: Path) -> None:
    from gr_models.export.loader import load_program

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.SiLU())
    x = torch.randn(5, 3)
    torch.export.save(torch.export.export(module, (x,)), tmp_path / "p.pt2")
    assert torch.equal(load_program(tmp_path / "p.pt2").module()(x), module(x))
    assert torch.load is not None and torch.load.__name__ == "load"  # the guard is undone after loading
