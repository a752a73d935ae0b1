"""Host synchronizations of a training lookup on the caching layout (``caching=True``: a device cache
in front of a host table), and of its update.

Per training lookup (``table.lookup`` then ``table.apply_gradients``, unique keys, a host table that
cannot grow): the compaction of the rows the cache evicts (two, in the index) and one read of the
lookup's counts; when the cache refuses keys, two more (how many the host table lost, and in the
update the positions of those it holds).

CPU: the operations that synchronize a CUDA device (``nonzero``, ``.item()`` / ``int()`` / ``bool()``,
``torch.unique``, boolean-mask indexing, ``masked_select``, ``.tolist()``) are counted as they are
dispatched, on the interpreted Triton index; the CPU-only torch fallback of the row scatter (one
Triton kernel on CUDA) is left out. GPU (``-m gpu``): ``torch.cuda.set_sync_debug_mode("warn")``.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynamicemb import DynamicEmbeddingTable, DynamicEmbOptimizerArgs, DynamicEmbTableOptions
from dynamicemb.types import DynamicEmbScoreStrategy

_SYNCING_OPS = {"nonzero", "_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}
_CPU_ONLY_FALLBACKS = ("row_moves.py",)  # scatter_rows compacts on the CPU; on CUDA it is one kernel


def _fallback_only() -> bool:
    return any(frame.filename.endswith(_CPU_ONLY_FALLBACKS) for frame in traceback.extract_stack())


class _SyncCounter(TorchDispatchMode):
    """Counts dispatched operations that would wait for a CUDA device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def record(self, what: str) -> None:
        if not _fallback_only():
            frames = [f for f in traceback.extract_stack() if "/dynamicemb/" in f.filename]
            self.sites.append(f"{what} at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        masked = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in _SYNCING_OPS or masked:
            self.record(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SyncCounter]:
    counter = _SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor):
        counter.record("tolist")
        return tolist(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        with counter:
            yield counter


def _cached_table(device: torch.device, cache_rows: int, backing_rows: int, backend: str) -> DynamicEmbeddingTable:
    """A cache of ``cache_rows`` (buckets of 16) in front of a host table of ``backing_rows`` slots that
    is created at its full size (it never grows)."""
    dim, optimizer = 8, DynamicEmbOptimizerArgs()
    options = DynamicEmbTableOptions(
        caching=True,
        global_hbm_for_values=cache_rows * dim * 4,
        bucket_capacity=16,
        init_capacity=backing_rows,
        max_capacity=backing_rows,
        score_strategy=DynamicEmbScoreStrategy.TIMESTAMP,
    )
    return DynamicEmbeddingTable(
        name="t",
        dim=dim,
        num_embeddings=backing_rows,
        options=options,
        optimizer=optimizer,
        device=device,
        hash_backend=backend,
    )


def _step(table: DynamicEmbeddingTable, keys: torch.Tensor) -> None:
    embeddings, handle = table.lookup(keys, training=True)
    assert handle is not None
    table.apply_gradients(handle, torch.ones_like(embeddings, dtype=torch.float32))


def _unique_batches(device: torch.device, steps: int, size: int, key_range: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randperm(key_range, generator=g)[:size].to(device) for _ in range(steps)]


@pytest.mark.parametrize(("batch", "refusing"), [(40, False), (200, True)], ids=["evicting", "refusing"])
def test_cached_training_lookup_synchronizations(monkeypatch: pytest.MonkeyPatch, batch: int, refusing: bool) -> None:
    """A cache of 128 rows (8 buckets of 16) over a host table of 4096 slots: batches of 40 keys out
    of 1000 make the cache evict (about 5 new keys a bucket, never more than 16), batches of 200
    make it refuse keys too (about 25 new keys a bucket)."""
    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    table = _cached_table(cpu, 128, 4096, "triton")
    batches = _unique_batches(cpu, 10, batch, 1000)
    for keys in batches[:7]:  # fill the cache
        _step(table, keys)
    assert table.store.cache.size() == table.store.cache.capacity
    per_step = []
    for keys in batches[7:]:
        with _count_syncs(monkeypatch) as counter:
            embeddings, handle = table.lookup(keys, training=True)
            table.apply_gradients(handle, torch.ones_like(embeddings))
        assert (handle.lookup.elsewhere_pos.numel() > 0) == refusing
        per_step.append(counter.sites)
    expected = 5 if refusing else 3
    assert all(len(sites) == expected for sites in per_step), per_step


@pytest.mark.gpu
def test_cuda_cached_training_lookup_synchronizes_three_times() -> None:
    """CUDA: a cache of 64K rows (512 buckets of 128) that evicts, over a host table of 1M slots read
    by kernels through mapped pinned memory; batches of 10K unique keys out of 300K (about 20 new
    keys a bucket: none refused). Three synchronizations per lookup and update: the two of the
    cache's eviction compaction and the read of the lookup's counts."""
    cuda = torch.device("cuda")
    options = DynamicEmbTableOptions(
        caching=True,
        global_hbm_for_values=(1 << 16) * 32 * 4,
        init_capacity=1 << 20,
        max_capacity=1 << 20,
        score_strategy=DynamicEmbScoreStrategy.TIMESTAMP,
    )
    table = DynamicEmbeddingTable(name="t", dim=32, num_embeddings=1 << 20, options=options, device=cuda)
    if getattr(table.store.backing.values, "host_access", "kernel") != "kernel":
        pytest.skip("this GPU cannot map pinned host memory into kernels: host rows move by copies (more syncs)")
    batches = _unique_batches(cuda, 16, 10_000, 300_000)
    for keys in batches[:12]:  # about 100K keys through 64K cache rows (some 200 a bucket): full, evicting
        _step(table, keys)
    assert table.store.cache.size() == table.store.cache.capacity
    with _cuda_sync_warnings() as syncs:
        for keys in batches[12:]:
            _step(table, keys)
    assert len(syncs) == 3 * len(batches[12:]), syncs


@contextmanager
def _cuda_sync_warnings() -> Iterator[list[str]]:
    """The messages of the synchronizations the block makes, under ``set_sync_debug_mode("warn")``
    (filled when the block ends)."""
    messages: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield messages
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages += [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
