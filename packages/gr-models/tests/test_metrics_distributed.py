"""Metrics combine every rank's updates (2 gloo processes on CPU), with uneven data per rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from gr_models.metrics import MultiTaskBinaryMetrics, RetrievalMetrics

ROWS_PER_RANK = (37, 80)


pytestmark = pytest.mark.slow  # 2-rank worker processes


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows = sum(ROWS_PER_RANK)
    labels = (torch.rand(rows, 2, generator=generator) < 0.4).double()
    logits = torch.randn(rows, 2, generator=generator, dtype=torch.float64) + labels
    ranks = torch.randint(0, 30, (rows,), generator=generator)
    return logits, labels, ranks


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers do)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits, labels, ranks = _data()
        start = sum(ROWS_PER_RANK[:rank])
        part = slice(start, start + ROWS_PER_RANK[rank])
        binary = MultiTaskBinaryMetrics(["a", "b"])
        binary.update(logits[part], labels[part])
        retrieval = RetrievalMetrics([1, 10])
        retrieval.update_from_ranks(ranks[part])
        results = {**binary.compute(), **retrieval.compute()}
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_ranks(tmp_path):
    out = str(tmp_path / "results")
    # fork: the children inherit the imported modules (spawning would re-import torch in each, ~10 s here)
    mp.start_processes(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True, start_method="fork")
    logits, labels, ranks = _data()
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        for t, name in enumerate("ab"):
            y = labels[:, t].numpy()
            assert abs(results[f"auc/{name}"] - roc_auc_score(y, logits[:, t].numpy())) < 1e-12
            assert abs(results[f"logloss/{name}"] - log_loss(y, torch.sigmoid(logits[:, t]).numpy())) < 1e-9
        assert abs(results["hr@10"] - float((ranks < 10).double().mean())) < 1e-12
        assert abs(results["mrr"] - float((1.0 / (ranks.double() + 1)).mean())) < 1e-12
