"""Crafted checkpoints, one per attack vector, loaded in a fresh process: each fails with a clear
error and its payload (creating a marker directory) never runs."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import gr_checkpoint
from gr_checkpoint.integrity import list_checkpoint_files, record_files
from gr_checkpoint.manifest import manifest_checksum
from gr_checkpoint.torch_state import collect_torch_state

WORKER = Path(__file__).with_name("untrusted_load_worker.py")


class Payload:
    """Unpickling it creates the directory ``marker``: the side effect a test must never see."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(path: Path, extra_state: object = None) -> Path:
    model, optimizer = _trained()
    return gr_checkpoint.save(path, model, optimizer, extra_state=extra_state)


def _reseal(path: Path) -> None:
    """The attacker's side: make the manifest's checksums match the crafted files, so that what is
    tested is the refusal to run or reach anything, not the checksums."""
    _edit_manifest(
        path, files={n: dataclasses.asdict(r) for n, r in record_files(path, list_checkpoint_files(path)).items()}
    )


def _edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    manifest["checksum"] = manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_dcp_metadata(path: Path, edit) -> None:
    metadata_file = path / "torch_module" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # the attacker's side: trusted here
    edit(metadata)
    metadata_file.write_bytes(pickle.dumps(metadata))
    _reseal(path)


def _legacy(path: Path, extra_state: object) -> Path:
    """A format-1 checkpoint: the extra state pickled inside torch_module/, as gr-checkpoint 0.1 wrote it."""
    model, optimizer = _trained()
    _save(path)
    state = collect_torch_state(model, optimizer, None)
    buffer = io.BytesIO()
    torch.save(extra_state, buffer)
    state["extra_state"] = buffer
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path / "torch_module"), no_dist=True)
    _edit_manifest(path, format_version=1, has_extra_state=True)
    return path


def _load_in_fresh_process(paths: list[Path]) -> dict[str, list[str]]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, str(WORKER), *map(str, paths)], capture_output=True, text=True, env=env, timeout=300
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    return json.loads(lines[-1].removeprefix("RESULTS "))


def test_crafted_checkpoints_fail_clearly_without_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    outside = tmp_path / "outside.distcp"
    outside.write_bytes(b"not yours")
    cases: dict[str, tuple[Path, str, str]] = {}

    path = _save(tmp_path / "extra_state_pickle", extra_state={"step": 1})
    torch.save(
        {"format": "gr-checkpoint-extra-state-1", "tree": "0", "tensors": [Payload(marker)]}, path / "extra_state.pt"
    )
    _reseal(path)
    cases["extra state"] = (path, "UnsafeCheckpointError", "extra_state.pt: refused or unreadable")

    path = _save(tmp_path / "dcp_metadata_pickle")
    (path / "torch_module" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(path)
    cases["DCP metadata"] = (path, "UnsafeCheckpointError", ".metadata: refused to unpickle")

    path = _save(tmp_path / "dcp_value_pickle")
    model, optimizer = _trained()
    state = collect_torch_state(model, optimizer, None)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path / "torch_module"), no_dist=True)
    _reseal(path)
    cases["DCP value"] = (path, "UnsafeCheckpointError", "refused to unpickle")

    path = _save(tmp_path / "dcp_parent_path")

    def point_outside(metadata) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = "../../outside.distcp"

    _rewrite_dcp_metadata(path, point_outside)
    cases["../ in DCP metadata"] = (path, "UnsafeCheckpointError", "'../../outside.distcp', which is not a plain")

    path = _save(tmp_path / "manifest_parent_path")
    _edit_manifest(path, dynamic_tables={"..": {"items": {"dim": 4, "dtype": "float32"}}})
    cases["../ in manifest"] = (path, "UnsafeCheckpointError", "manifest.json: names '..'")

    path = _save(tmp_path / "symlinked_file")
    data_file = next((path / "torch_module").glob("*.distcp"))
    data_file.unlink()
    data_file.symlink_to(outside)
    cases["symlink out"] = (path, "UnsafeCheckpointError", "outside the checkpoint folder")

    path = _legacy(tmp_path / "legacy", Payload(marker))
    cases["format 1"] = (path, "LegacyCheckpointError", f"gr-checkpoint convert --trust {path}")

    results = _load_in_fresh_process([case[0] for case in cases.values()])

    for vector, (path, error, message) in cases.items():
        got_error, got_message = results[str(path)]
        assert (got_error, message in got_message) == (error, True), f"{vector}: {got_error}: {got_message}"
        assert "\n" not in got_message, vector
    assert not marker.exists(), "a payload ran"


def test_unsafe_extra_state_is_refused_at_save_naming_key_and_type(tmp_path: Path) -> None:
    model, optimizer = _trained()
    bad = {"loader": {"position": 3, "sampler": object()}}
    with pytest.raises(
        gr_checkpoint.UnsafeExtraStateError, match=r"extra_state\['loader'\]\['sampler'\] is a builtins.object"
    ):
        gr_checkpoint.save(tmp_path / "ckpt", model, optimizer, extra_state=bad)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / ".ckpt.incomplete").exists()


def test_trainer_like_extra_state_round_trips(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    import random

    model, optimizer = _trained()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    scheduler.step()
    extra = {
        "step": 7,
        "history": {"loss": [(1, 0.5), (2, 0.25)]},
        "scheduler": scheduler.state_dict(),
        "sparse_optimizers": {"items": optimizer.state_dict()},
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "seconds": np.float64(1.5),
    }
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer, extra_state=extra)
    loaded = gr_checkpoint.load(tmp_path / "ckpt", *_trained())

    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])
    assert np.array_equal(loaded["rng"]["numpy"][1], extra["rng"]["numpy"][1])
    assert loaded["rng"]["python"] == extra["rng"]["python"]
    assert torch.equal(loaded["rng"]["torch"], extra["rng"]["torch"])
    assert loaded["scheduler"] == extra["scheduler"] and loaded["history"] == extra["history"]
    assert loaded["sparse_optimizers"]["items"]["state"].keys() == {0, 1}
    assert loaded["seconds"] == 1.5 and isinstance(loaded["seconds"], np.float64)


def test_trusted_format_1_checkpoint_converts_and_loads(tmp_path: Path) -> None:
    rng = torch.get_rng_state()
    path = _legacy(tmp_path / "legacy", {"step": 3, "rng": rng})
    with pytest.raises(gr_checkpoint.LegacyCheckpointError, match="convert --trust"):
        gr_checkpoint.load(path, *_trained())
    with pytest.raises(PermissionError, match="trust"):
        gr_checkpoint.convert_trusted_checkpoint(path)

    run = subprocess.run(
        [sys.executable, "-m", "gr_checkpoint", "convert", "--trust", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "converted to format 3" in run.stdout

    model, optimizer = _trained()
    loaded = gr_checkpoint.load(path, model, optimizer)
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], rng)
    assert gr_checkpoint.read_manifest(path).format_version == 3
    assert not gr_checkpoint.convert_trusted_checkpoint(path, trust=True)
