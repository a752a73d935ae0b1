"""Asynchronous saves: the state at the call is what is saved while training goes on, the checkpoint
appears only when complete, a second save waits for the first, background errors surface. Several
ranks saving asynchronously (and killed while writing): test_crash_safety.py."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import gr_checkpoint
import gr_checkpoint.checkpoint as checkpoint_module

HERE = Path(__file__).parent


def _load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load_module("recommender_model")  # a Recommender, its training and exact snapshots


def _train(model: Any, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        optimizer.zero_grad()
        model(models.batch(seed)).sigmoid().sum().backward()
        optimizer.step()


def _loaded(path: Path) -> tuple[dict[str, Any], Any]:
    model, optimizer = models.trained(seed=9, steps=0)
    extra = gr_checkpoint.load(path, model, optimizer)
    return models.snapshot(model, optimizer), extra


@pytest.fixture(autouse=True)
def _no_pending_save() -> Iterator[None]:
    yield
    with contextlib.suppress(RuntimeError):
        gr_checkpoint.wait_for_saves()


def test_saves_the_state_at_the_call_while_training_goes_on(tmp_path: Path) -> None:
    model, optimizer = models.trained(seed=0)
    expected = models.snapshot(model, optimizer)
    extra = {"step": 3, "weights": model.head.weight}  # a tensor that training changes in place
    handle = gr_checkpoint.save(tmp_path / "async", model, optimizer, extra_state=extra, step=3, asynchronous=True)
    assert isinstance(handle, gr_checkpoint.SaveHandle)
    _train(model, optimizer, range(50, 53))  # while the files are written
    assert handle.wait() == tmp_path / "async" and handle.done()
    changed = models.snapshot(model, optimizer)
    assert not models.identical(changed, expected)

    restored, loaded_extra = _loaded(tmp_path / "async")
    assert models.identical(restored, expected)
    assert torch.equal(loaded_extra["weights"], expected["model"]["head.weight"])
    assert gr_checkpoint.read_manifest(tmp_path / "async").step == 3
    # The same files as a synchronous save writes.
    gr_checkpoint.save(tmp_path / "sync", model, optimizer, extra_state=extra)
    assert sorted(gr_checkpoint.read_manifest(tmp_path / "sync").files) == sorted(
        gr_checkpoint.read_manifest(tmp_path / "async").files
    )


def _gate(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make background writes stop before their first file until ``release`` is set."""
    started, release = threading.Event(), threading.Event()
    real = checkpoint_module.write_table_snapshots

    def gated(*args: Any, **kwargs: Any) -> None:
        started.set()
        assert release.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_table_snapshots", gated)
    return started, release


def test_visible_only_when_complete_and_a_second_save_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = models.trained(seed=0)
    started, release = _gate(monkeypatch)
    first = gr_checkpoint.save_step(tmp_path, 1, model, optimizer, asynchronous=True)
    assert started.wait(30)
    assert not (tmp_path / "step_1").exists() and (tmp_path / ".step_1.incomplete").is_dir()
    assert gr_checkpoint.latest_checkpoint(tmp_path) is None

    order: list[str] = []
    second = threading.Thread(
        target=lambda: order.append(str(gr_checkpoint.save_step(tmp_path, 2, model, optimizer, keep_last=1)))
    )
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and not order  # waiting for the first
    release.set()
    second.join(60)
    assert first.done() and first.wait() == tmp_path / "step_1"
    assert order == [str(tmp_path / "step_2")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]  # keep_last=1 pruned step_1 after it


def _failing_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_module, "write_table_snapshots", fail)


def test_background_error_surfaces_on_wait_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = models.trained(seed=0)
    path = gr_checkpoint.save(tmp_path / "ckpt", model, optimizer, extra_state={"step": 3})
    before = models.snapshot(model, optimizer)
    _train(model, optimizer, range(60, 62))
    _failing_writer(monkeypatch)
    handle = gr_checkpoint.save(path, model, optimizer, extra_state={"step": 5}, asynchronous=True)
    with pytest.raises(OSError, match="disk full"):
        handle.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    restored, extra = _loaded(path)
    assert extra == {"step": 3} and models.identical(restored, before)
    monkeypatch.undo()
    gr_checkpoint.save(path, model, optimizer, extra_state={"step": 5})  # reported already: the next save runs
    assert _loaded(path)[1] == {"step": 5}


def test_unobserved_background_error_surfaces_on_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = models.trained(seed=0)
    _failing_writer(monkeypatch)
    gr_checkpoint.save(tmp_path / "a", model, optimizer, asynchronous=True)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"asynchronous save of .*a failed") as raised:
        gr_checkpoint.save(tmp_path / "b", model, optimizer)
    assert isinstance(raised.value.__cause__, OSError)
    assert not (tmp_path / "b").exists()
    gr_checkpoint.save(tmp_path / "b", model, optimizer)
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "manifest.json").is_file()
