"""Checksums of every checkpoint file (flipped bytes, truncation, missing files are named) and
all-or-nothing loads (a failed load leaves model, optimizer and dynamic tables bit-identical)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import gr_checkpoint
from gr_checkpoint import CheckpointCorruptError, CheckpointMismatchError
from gr_checkpoint.integrity import list_checkpoint_files, record_files
from gr_checkpoint.manifest import manifest_checksum


def _load_helper(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load_helper("recommender_model")
_trained, _snapshot, _identical = models.trained, models.snapshot, models.identical


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, optimizer = _trained(seed=0)
    path = tmp_path_factory.mktemp("integrity") / "ckpt"
    return gr_checkpoint.save(path, model, optimizer, extra_state={"step": 3, "rng": torch.get_rng_state()})


@pytest.fixture
def checkpoint(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def test_manifest_records_every_file(checkpoint: Path) -> None:
    manifest = gr_checkpoint.read_manifest(checkpoint)
    assert manifest.format_version == 3
    assert manifest.files is not None
    assert sorted(manifest.files) == list_checkpoint_files(checkpoint)
    assert {".metadata", "__0_0.distcp"} <= {name.rsplit("/", 1)[-1] for name in manifest.files}
    assert {"extra_state.pt", "dynamicemb_module/embeddings/items.dynamicemb"} <= set(manifest.files)
    assert manifest.files == record_files(checkpoint, manifest.files)


def _positions(size: int) -> list[int]:
    return sorted({0, size - 1, *range(0, size, max(1, size // 16))})


def test_every_flipped_byte_of_every_file_is_named(checkpoint: Path) -> None:
    files = list_checkpoint_files(checkpoint)
    assert len(files) >= 5
    tried = 0
    for name in files:
        path = checkpoint / name
        original = path.read_bytes()
        for position in _positions(len(original)):
            damaged = bytearray(original)
            damaged[position] ^= 0x01
            path.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointCorruptError, match=re.escape(str(path)) + ": corrupt: CRC32"):
                gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))
            tried += 1
        path.write_bytes(original)
    assert tried > 5 * 16
    gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))  # the restored files load


@pytest.mark.parametrize("keep", [0, 0.5, -1])
def test_truncated_files_are_named(checkpoint: Path, keep: float) -> None:
    for name in list_checkpoint_files(checkpoint):
        path = checkpoint / name
        original = path.read_bytes()
        path.write_bytes(original[: int(len(original) * keep) if keep >= 0 else len(original) - 1])
        with pytest.raises(CheckpointCorruptError, match=re.escape(str(path)) + ": truncated: "):
            gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))
        path.write_bytes(original)


def test_a_damaged_manifest_that_still_parses_is_caught(checkpoint: Path) -> None:
    manifest = checkpoint / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"shape": [6, 8]', '"shape": [6, 9]', 1))
    assert manifest.read_text() != text
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(manifest)) + ": corrupt: its checksum field"):
        gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))


def test_a_missing_file_is_named(checkpoint: Path) -> None:
    (checkpoint / "dynamicemb_module" / "embeddings" / "users.dynamicemb").unlink()
    with pytest.raises(
        CheckpointCorruptError, match=r"users\.dynamicemb: missing; the manifest lists it \(\d+ bytes\)"
    ):
        gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))


def test_format_2_checkpoint_loads_with_a_warning_and_converts(checkpoint: Path) -> None:
    raw = json.loads((checkpoint / "manifest.json").read_text())
    for field in ("files", "checksum"):
        raw.pop(field)
    raw["format_version"] = 2
    (checkpoint / "manifest.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="format-2 checkpoint without checksums.*convert --trust"):
        assert gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))["step"] == 3
    assert gr_checkpoint.convert_trusted_checkpoint(checkpoint, trust=True)
    assert gr_checkpoint.read_manifest(checkpoint).files == record_files(checkpoint, list_checkpoint_files(checkpoint))


# All-or-nothing: every failure below leaves a trained model, its optimizer and its tables as they were.


def _reseal(path: Path) -> None:
    """Record the damaged files' checksums, so that the failure comes from reading, not from the checksums."""
    raw = json.loads((path / "manifest.json").read_text())
    records = record_files(path, list_checkpoint_files(path))
    raw["files"] = {name: dataclasses.asdict(record) for name, record in records.items()}
    raw["checksum"] = manifest_checksum(raw)
    (path / "manifest.json").write_text(json.dumps(raw))


def _flip_table_byte(path: Path) -> None:
    table = path / "dynamicemb_module" / "embeddings" / "users.dynamicemb"
    data = bytearray(table.read_bytes())
    data[20] ^= 0xFF
    table.write_bytes(bytes(data))


def _truncate_distcp(path: Path) -> None:
    data = path / "torch_module" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-200])


def _swap_tables_resealed(path: Path) -> None:
    folder = path / "dynamicemb_module" / "embeddings"
    (folder / "items.dynamicemb").rename(folder / "tmp")
    (folder / "users.dynamicemb").rename(folder / "items.dynamicemb")
    (folder / "tmp").rename(folder / "users.dynamicemb")
    _reseal(path)


def _truncate_distcp_resealed(path: Path) -> None:
    _truncate_distcp(path)
    _reseal(path)


FAILURES = {
    "flipped byte in a dynamic table": (_flip_table_byte, CheckpointCorruptError, r"users\.dynamicemb: corrupt"),
    "truncated .distcp": (_truncate_distcp, CheckpointCorruptError, r"__0_0\.distcp: truncated"),
    "dynamic table refused by dynamicemb after the dense part was read": (
        _swap_tables_resealed,
        ValueError,
        r"items\.dynamicemb: holds table 'users', not 'items'",
    ),
    "truncated .distcp with matching checksums (DCP fails mid-read)": (
        _truncate_distcp_resealed,
        CheckpointCorruptError,
        r"torch_module: rank 0: ",
    ),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_load_changes_nothing(checkpoint: Path, failure: str) -> None:
    damage, error, message = FAILURES[failure]
    damage(checkpoint)
    model, optimizer = _trained(seed=5, steps=2)
    before = _snapshot(model, optimizer)
    with pytest.raises(error, match=message):
        gr_checkpoint.load(checkpoint, model, optimizer)
    assert _identical(_snapshot(model, optimizer), before)
    assert before["rows"]["items"] and before["optimizer"]["state"]


def test_wrong_shape_changes_nothing_and_names_both_shapes(checkpoint: Path) -> None:
    model, optimizer = _trained(seed=5, steps=2, hidden=7)
    before = _snapshot(model, optimizer)
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(
            "model key 'hidden.weight': checkpoint has shape [6, 8] float32, model has shape [7, 8] float32"
        ),
    ):
        gr_checkpoint.load(checkpoint, model, optimizer)
    assert _identical(_snapshot(model, optimizer), before)


def test_failed_load_leaves_a_fresh_optimizer_empty(checkpoint: Path) -> None:
    _truncate_distcp_resealed(checkpoint)
    model, optimizer = _trained(seed=5, steps=0)
    before = _snapshot(model, optimizer)
    with pytest.raises(CheckpointCorruptError):
        gr_checkpoint.load(checkpoint, model, optimizer)
    assert not optimizer.state
    assert _identical(_snapshot(model, optimizer), before)
    assert all(p.grad is None for p in model.parameters())


def test_a_missing_rank_is_named(checkpoint: Path) -> None:
    # A two-rank checkpoint whose rank-1 file is gone: the manifest lists it, the error says whose it was.
    data = checkpoint / "torch_module" / "__0_0.distcp"
    shutil.copy(data, data.with_name("__1_0.distcp"))
    _reseal(checkpoint)
    data.with_name("__1_0.distcp").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp: missing; .* \(written by rank 1\)"):
        gr_checkpoint.load(checkpoint, *_trained(seed=1, steps=0))


def test_latest_checkpoint_skips_incomplete_and_with_verify_corrupt_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        gr_checkpoint.save_step(tmp_path, step, nn.Linear(3, 2))
    short = tmp_path / "step_3" / "torch_module" / "__0_0.distcp"
    short.write_bytes(short.read_bytes()[:-1])
    flipped = tmp_path / "step_2" / "torch_module" / "__0_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint: .*step_3/torch_module/__0_0\.distcp"):
        assert gr_checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_2"  # sizes only: cheap
    with pytest.warns(UserWarning, match=r"step_2/torch_module/__0_0\.distcp: corrupt: CRC32"):
        assert gr_checkpoint.latest_checkpoint(tmp_path, verify=True) == tmp_path / "step_1"


def test_keep_last_removes_what_killed_saves_and_prunes_left(tmp_path: Path) -> None:
    for leftover in (".step_1.incomplete", ".step_0.deleting", ".step_9.incomplete"):
        (tmp_path / leftover / "torch_module").mkdir(parents=True)
    for step in (2, 3, 4):
        gr_checkpoint.save_step(tmp_path, step, nn.Linear(3, 2), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_9.incomplete", "step_3", "step_4"]
