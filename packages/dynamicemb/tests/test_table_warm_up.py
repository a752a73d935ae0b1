"""Kernels compiled when a table is created (issue 21): no Triton compilation at the first full bucket.

CPU: the option reaches the Triton index and the construction path runs the warm-up (recorded by a
stand-in), and the warm-up's launch sequence itself runs under the interpreter for every score
strategy. GPU (``-m gpu``): in a fresh process, a table created with the warm-up compiles nothing
afterwards while it fills, evicts (one score and per-key scores) and grows; without it, the same
calls compile (so the count does measure compilations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from dynamicemb import DynamicEmbeddingTable, DynamicEmbTableOptions
from dynamicemb.hash_index import (
    DynamicEmbScoreStrategy,
    create_hash_table,
    triton_backend,
)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Pretend the device compiles kernels; record the warm-up's launch sequences instead of running them."""
    calls: list[tuple] = []
    monkeypatch.setattr(triton_backend, "compiles_kernels", lambda device: True)
    monkeypatch.setattr(triton_backend, "exercise_kernels", lambda *args: calls.append(args))
    monkeypatch.setattr(triton_backend, "_WARMED_UP", set())
    return calls


def test_option_defaults_on() -> None:
    assert DynamicEmbTableOptions().warm_up_kernels is True


@pytest.mark.parametrize("warm_up", [True, False])
def test_table_construction_runs_the_warm_up(recorded: list[tuple], warm_up: bool) -> None:
    options = DynamicEmbTableOptions(
        warm_up_kernels=warm_up, bucket_capacity=16, score_strategy=DynamicEmbScoreStrategy.LFU
    )
    DynamicEmbeddingTable(name="t", dim=4, num_embeddings=256, options=options, hash_backend="triton")
    expected = [(torch.device("cpu"), 16, DynamicEmbScoreStrategy.LFU)] if warm_up else []
    assert recorded == expected


def test_warm_up_runs_once_per_configuration(recorded: list[tuple]) -> None:
    def make(bucket: int, strategy: DynamicEmbScoreStrategy):
        return create_hash_table(
            init_capacity=64, max_capacity=64, bucket_capacity=bucket, score_strategy=strategy, backend="triton"
        )

    make(16, DynamicEmbScoreStrategy.TIMESTAMP)
    make(16, DynamicEmbScoreStrategy.TIMESTAMP)
    make(8, DynamicEmbScoreStrategy.TIMESTAMP)
    make(16, DynamicEmbScoreStrategy.CUSTOMIZED)
    assert [(bucket, strategy) for _, bucket, strategy in recorded] == [
        (16, DynamicEmbScoreStrategy.TIMESTAMP),
        (8, DynamicEmbScoreStrategy.TIMESTAMP),
        (16, DynamicEmbScoreStrategy.CUSTOMIZED),
    ]


def test_warm_up_is_a_no_op_on_the_cpu() -> None:
    table = create_hash_table(init_capacity=64, max_capacity=64, bucket_capacity=16, backend="triton")
    assert table.warm_up() is False
    assert table.size() == 0


@pytest.mark.parametrize("strategy", list(DynamicEmbScoreStrategy), ids=lambda s: s.name)
def test_warm_up_launch_sequence_runs(strategy: DynamicEmbScoreStrategy) -> None:
    """The scratch-table calls are valid for every strategy (interpreted on the CPU, tiny buckets)."""
    triton_backend.exercise_kernels(torch.device("cpu"), 4, strategy)


_CHILD = r"""
import json, sys
import torch
from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table
from dynamicemb.hash_index import triton_grouped_eviction as grouped, triton_kernels as kernels

KERNELS = [kernels.lookup_kernel, kernels.find_or_insert_kernel, grouped.place_deferred_kernel,
           grouped.evict_grouped_kernel, grouped.evict_ranked_kernel]

def compiled():
    # device_caches[device][0] is the kernel cache of a JITFunction (one entry per compiled variant).
    return sum(len(cache[0]) for kernel in KERNELS for cache in kernel.device_caches.values())

strategy, warm_up = DynamicEmbScoreStrategy[sys.argv[1]], sys.argv[2] == "1"
device = torch.device("cuda")
table = create_hash_table(init_capacity=1 << 14, max_capacity=1 << 15, bucket_capacity=128,
                          score_strategy=strategy, device=device, warm_up=warm_up)
torch.cuda.synchronize()
after_creation = compiled()
g = torch.Generator(device=device).manual_seed(0)
evicted = 0
for step in range(6):
    keys = torch.randint(-(2**62), 2**62, (5000 + step,), device=device, generator=g)
    scores = torch.full_like(keys, 10**12 + step)
    # CUSTOMIZED inserts only with scores; both strategies insert more keys than max_capacity over the steps
    full_scores = scores if strategy == DynamicEmbScoreStrategy.CUSTOMIZED else None
    evicted += table.find_or_insert(keys, full_scores).evicted_keys.numel()
    evicted += table.find_or_insert(keys[: keys.numel() // 2] + 1, scores[: keys.numel() // 2]).evicted_keys.numel()
    table.find(keys, update_score=True)
    if step == 0:
        table.reserve(table.capacity)  # grows once (rehash), then stays at max_capacity
torch.cuda.synchronize()
print("RESULT " + json.dumps({"after_creation": after_creation, "after_calls": compiled(), "evicted": evicted}))
"""


def _child_counts(strategy: str, warm_up: bool) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, strategy, "1" if warm_up else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"the child process failed:\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULT ") :])


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["TIMESTAMP", "LFU", "CUSTOMIZED"])
def test_first_eviction_compiles_nothing_after_warm_up(strategy: str) -> None:
    counts = _child_counts(strategy, warm_up=True)
    assert counts["evicted"] > 0, f"the calls evicted nothing, so they did not reach the eviction kernels: {counts}"
    assert counts["after_creation"] > 0, f"the warm-up compiled nothing: {counts}"
    assert counts["after_calls"] == counts["after_creation"], f"calls after creation compiled kernels: {counts}"


@pytest.mark.gpu
def test_without_warm_up_the_calls_compile() -> None:
    counts = _child_counts("TIMESTAMP", warm_up=False)
    assert counts["after_creation"] == 0, counts
    assert counts["after_calls"] > 0, counts
