"""Host synchronizations of one training step of `tools/bench_e2e.py`'s small configuration (issue 16).

The step is the one the bench times (`bench_e2e.Trainer.step` with the prefetching, fused-AdamW variant): the batch
already on the device, `RankingGR` forward (embeddings, HSTU preprocessing, two HSTU layers, head, BCE), backward
(with the dynamic tables' fused optimizer), gradient clipping and the dense optimizer step.

CPU: the operations that would make the host wait for a CUDA device are counted as they are dispatched:
``nonzero``, ``_local_scalar_dense`` (``.item()`` / ``int()`` / ``bool()`` / ``float()``), ``_unique2`` /
``unique_dim`` / ``unique_consecutive``, ``masked_select``, ``equal``, ``_coalesce``, ``bincount``, indexing and
``index_put`` with a boolean mask, ``repeat_interleave`` without ``output_size``, and ``Tensor.tolist()`` /
``.cpu()`` / ``.numpy()`` calls. Each is attributed to the innermost source line of the repository's packages.
Not counted: reads inside `gr_models.data.host_view`'s host functions (they read the batch's host copy, which holds
CPU tensors only), reads made by torch's optimizers themselves (their step counters are host tensors; the bench's
fused AdamW keeps them on the device) and dynamicemb's CPU-only row scatter fallback (one Triton kernel on CUDA).
The dynamic tables use the Triton hash index (interpreted here), as on CUDA. Syncs inside one CUDA kernel's
implementation that the CPU dispatch cannot show, and host-to-device copies, are not seen here (the GPU test sees
them).

Per step, 28 at commit 2921df6, now 7, none in gr-models:
    dynamicemb/modules/input_checks.py (validate the KJT's lengths, one read per dynamic collection)   2
    dynamicemb/storage/key_value_store.py (counts of new and stored keys, per dynamic table)            2
    dynamicemb/lookup.py (torch.unique of the looked-up keys, per dynamic table)                       2
    hstu_attn/_validation.py (value checks of new seq_offsets, once per step: the layers share them)   1
The 21 removed were gr-models': 13 in the HSTU preprocessing (token totals, max_len, contextual prefix, candidate
and alignment checks, three boolean-mask row selections), 3 in the backward of those selections, 3 building the
per-collection KJTs of the embedding lookup, 2 checking the static action ids.
The `gr-train` step of the demo configuration (`configs/synthetic_ranking.yaml`: three static tables with sparse
gradients, one data-parallel static table) went from 42 to 5: four in `SparseRowOptimizer` (the row-sparse update
of each unsharded static table finds its touched rows: `coalesce` of a sparse gradient, `nonzero` of a dense one)
and the `hstu_attn` check.
GPU (``-m gpu``): the bench step under ``torch.cuda.set_sync_debug_mode("warn")``.
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
_WAITING_OPS |= {"equal", "_coalesce", "bincount"}  # coalesce and bincount size their output by the data
_HOST_READS = ("host_sequence_counts", "host_id_range")  # gr_models.data.host_view: CPU tensors only
_CPU_FALLBACKS = ("row_moves.py",)  # dynamicemb scatters rows on the CPU here; on CUDA it is one Triton kernel
_DISPATCH_MACHINERY = ("/torch/_compile.py", "/torch/_dynamo/", "/torch/utils/_python_dispatch.py")
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
        stack = [f for f in traceback.extract_stack()[:-2] if not any(m in f.filename for m in _DISPATCH_MACHINERY)]
        if any(f.name in _HOST_READS or f.filename.endswith(_CPU_FALLBACKS) for f in stack):
            return
        if "/torch/optim/" in stack[-1].filename:  # the step counters of torch's optimizers: host tensors
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


def test_demo_gr_train_step_synchronizes_only_in_the_sparse_optimizers_and_hstu_attn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`gr-train --config configs/synthetic_ranking.yaml`: one step after two, the batch fetched before counting
    (the data loader works on the host). Five per step (module docstring)."""
    from gr_models.trainer import Trainer, load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic_ranking.yaml"
    trainer = Trainer(load_config(config, [f"output_dir={tmp_path}", "train.progress_bar=false"]))
    trainer.model.train()
    batches = trainer._batches()
    for _ in range(2):
        trainer.train_step(batches)
    batch = next(batches)
    with _counting(monkeypatch) as counter:
        trainer.train_step(iter([batch]))
    files = sorted(site.split(":")[0] for _, site in counter.sites)
    assert files == ["gr_models/modules/sparse_optimizer.py"] * 4 + ["hstu_attn/_validation.py"], counter.sites


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
