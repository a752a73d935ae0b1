"""Host synchronizations of one training step of `tools/bench_e2e.py`'s small configuration (issue 16).

The step is the one the bench times (`bench_e2e.Trainer.step` with the prefetching, fused-AdamW variant): the batch
already on the device, `RankingGR` forward (embeddings, HSTU preprocessing, two HSTU layers, head, BCE), backward
(with the dynamic tables' fused optimizer), gradient clipping and the dense optimizer step.

CPU: the operations that would make the host wait for a CUDA device are counted as they are dispatched:
``nonzero``, ``_local_scalar_dense`` (``.item()`` / ``int()`` / ``bool()`` / ``float()``), ``_unique2`` /
``unique_dim`` / ``unique_consecutive``, ``masked_select``, ``equal``, indexing and ``index_put`` with a boolean
mask, ``repeat_interleave`` without ``output_size``, and ``Tensor.tolist()`` / ``.cpu()`` / ``.numpy()`` calls.
Not counted: reads inside `gr_models.data.host_view`'s host functions (they read the batch's host copy, which holds
CPU tensors only), the optimizers' step counters (host tensors on CUDA too; the bench's fused AdamW keeps them on
the device) and dynamicemb's CPU-only row scatter fallback (one Triton kernel on CUDA). The dynamic tables use the
Triton hash index (interpreted here), as on CUDA.

Per step, 28 at commit 2921df6, now 7, none in gr-models:
    dynamicemb/modules/input_checks.py (validate the KJT's lengths, one read per dynamic collection)   2
    dynamicemb/storage/key_value_store.py (counts of new and stored keys, per dynamic table)            2
    dynamicemb/lookup.py (torch.unique of the looked-up keys, per dynamic table)                       2
    hstu_attn/_validation.py (value checks of new seq_offsets, once per step: the layers share them)   1
The 21 removed were gr-models': 13 in the HSTU preprocessing (token totals, max_len, contextual prefix, candidate
and alignment checks, three boolean-mask row selections), 3 in the backward of those selections, 3 building the
per-collection KJTs of the embedding lookup, 2 checking the static action ids.
GPU (``-m gpu``): the same step under ``torch.cuda.set_sync_debug_mode("warn")``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gr_models.data.batch import Batch

_BENCH = Path(__file__).resolve().parents[3] / "tools" / "bench_e2e.py"
_WAITING_OPS = {"nonzero", "_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}
_WAITING_OPS |= {"equal"}
_HOST_READS = ("host_sequence_counts", "host_id_range")  # gr_models.data.host_view: CPU tensors only
_NOT_DEVICE = ("/torch/optim/", "row_moves.py")
_EXPECTED_PER_STEP = 7


def _bench() -> ModuleType:
    if not _BENCH.exists():
        pytest.skip(f"{_BENCH} is not in this checkout")
    if "bench_e2e" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_e2e", _BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_e2e"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_e2e"]


def _site(stack: list[traceback.FrameSummary]) -> str:
    """`package/path.py:line` of the innermost frame in the repository's packages (or tools)."""
    ours = [f for f in stack if "/.venv/" not in f.filename and ("/src/" in f.filename or "/tools/" in f.filename)]
    frame = ours[-1] if ours else stack[-1]
    return f"{frame.filename.rsplit('/src/', 1)[-1].rsplit('/tools/', 1)[-1]}:{frame.lineno}"


class _WaitCounter(TorchDispatchMode):
    """Records `(operation, site)` of every dispatched operation that would wait for a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[tuple[str, str]] = []

    def record(self, operation: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(f.name in _HOST_READS for f in stack) or any(n in f.filename for f in stack for n in _NOT_DEVICE):
            return
        self.sites.append((operation, _site(stack)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in ("index", "index_put", "_index_put_impl") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.record(f"{name}[bool mask]")
        elif name == "repeat_interleave" and func._overloadname == "Tensor":
            if kwargs.get("output_size", args[1] if len(args) > 1 else None) is None:
                self.record("repeat_interleave without output_size")
        elif name in _WAITING_OPS:
            self.record(name)
        return func(*args, **kwargs)


@contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[_WaitCounter]:
    counter = _WaitCounter()
    with monkeypatch.context() as patch:
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)

            def counted(self, *args, _original=original, _method=method, **kwargs):
                counter.record(_method)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, method, counted)
        with counter:
            yield counter


def _small_setup(monkeypatch: pytest.MonkeyPatch, device: torch.device):
    """The bench's small model (dynamic tables on the Triton hash index, as on CUDA), its step and 4 batches."""
    bench = _bench()
    import dynamicemb.storage.key_value_store as key_value_store

    create = key_value_store.create_hash_table
    monkeypatch.setattr(key_value_store, "create_hash_table", lambda *a, **k: create(*a, **{**k, "backend": "triton"}))
    torch.manual_seed(0)
    config = bench.CONFIGS["small"]
    model = bench.build_model(config, device)
    generator = torch.Generator().manual_seed(1)
    batches = [bench.make_batch(config, "zipf", generator) for _ in range(4)]
    return bench.Trainer(model, device), bench.VARIANTS[4], batches


def _counted_steps(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[tuple[str, str]]], list[float], list]:
    """Sites per step of the two steps after two warm-up steps, the four losses and the final dense parameters."""
    trainer, variant, batches = _small_setup(monkeypatch, torch.device("cpu"))
    losses = [float(trainer.step(batch, variant, None)) for batch in batches[:2]]
    per_step = []
    for batch in batches[2:]:
        with _counting(monkeypatch) as counter:
            loss = trainer.step(batch, variant, None)
        per_step.append(counter.sites)
        losses.append(float(loss))
    return per_step, losses, [p.detach().clone() for p in trainer.params]


def test_small_bench_step_synchronizes_seven_times_none_in_gr_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven host synchronizations per step (module docstring), none of them in gr_models."""
    pytest.importorskip("triton")
    per_step, _, _ = _counted_steps(monkeypatch)
    for sites in per_step:
        assert [s for s in sites if s[1].startswith("gr_models/")] == [], sites
        assert len(sites) == _EXPECTED_PER_STEP, sites
        packages = sorted(site.split("/", 1)[0] for _, site in sites)
        assert packages == ["dynamicemb"] * 6 + ["hstu_attn"], sites


@pytest.mark.slow
def test_without_host_copy_the_step_reads_three_times_more_and_trains_identically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch with no host copy (built on the device) makes gr-models read its sizes and checks from the device:
    one fused read of the sequence sizes, one alignment check of the action feature, one read of the static action
    ids' range. Losses and parameters are bit-identical to the host-copy path."""
    pytest.importorskip("triton")
    _, host_losses, host_params = _counted_steps(monkeypatch)
    monkeypatch.setattr(Batch, "host_copy", lambda self: None)
    per_step, device_losses, device_params = _counted_steps(monkeypatch)
    for sites in per_step:
        ours = sorted(site for _, site in sites if site.startswith("gr_models/"))
        assert [s.split(":")[0] for s in ours] == [
            "gr_models/data/host_view.py",
            "gr_models/modules/embedding.py",
            "gr_models/modules/preprocessing.py",
        ], ours
    assert device_losses == host_losses
    assert all(torch.equal(a, b) for a, b in zip(device_params, host_params))


def test_host_copy_follows_the_batch_to_a_device_and_is_dropped_when_features_change() -> None:
    """`to()` keeps the host tensors (the meta device stands in for a GPU); a batch whose features were replaced
    after the move has no host copy, and a host batch is its own."""
    bench = _bench()
    batch = bench.make_batch(bench.CONFIGS["tiny"], "zipf", torch.Generator().manual_seed(1))
    assert batch.host_copy() is not None and batch.host_copy().features is batch.features
    moved = batch.to("meta")
    copy = moved.host_copy()
    assert copy is not None and copy.features is batch.features and copy.num_candidates is batch.num_candidates
    assert moved.to("meta").host_copy() is not None  # moved again: still described
    replaced = dataclasses.replace(moved, features=batch.features.to("meta"))
    assert replaced.host_copy() is None


@contextmanager
def _cuda_sync_warnings() -> Iterator[list[warnings.WarningMessage]]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
def test_cuda_small_bench_step_synchronizes_seven_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA: the step of a batch prefetched to the device (pinned host batch copied without blocking, as the bench's
    prefetcher does), counted by CUDA's sync debug mode; each warning names the Python line that waited.
    Expected as on the CPU: 7, none from gr_models (NOT RUN YET on a GPU)."""
    cuda = torch.device("cuda")
    trainer, variant, batches = _small_setup(monkeypatch, cuda)
    for batch in batches[:3]:
        trainer.step(batch.to(cuda, non_blocking=True), variant, None)
    batch = batches[3].to(cuda, non_blocking=True)
    torch.cuda.synchronize()
    with _cuda_sync_warnings() as caught:
        trainer.step(batch, variant, None)
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
    assert [s for s in syncs if "/gr_models/" in s] == [], syncs
    assert len(syncs) == _EXPECTED_PER_STEP, syncs
