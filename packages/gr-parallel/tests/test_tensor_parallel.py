"""Tensor-parallel mappings, layers, LayerNorm, RNG, clipping and embedding lookup: 2 gloo ranks vs one process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gr_parallel.tensor_parallel import sample_split, shard_of

sys.path.insert(0, str(Path(__file__).parent))  # the launcher lives beside this file
from gr_parallel_launch import run_ranks

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
FP32 = 1e-5


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(WORKER, 2, tmp_path_factory.mktemp("tp"))


def _checks(report: dict, prefix: str) -> dict[str, float]:
    return {k: v for k, v in report.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_mappings_forward_and_backward(reports: list[dict]) -> None:
    for report in reports:
        assert report["tp_size"] == 2
        for name in ("gather", "gather_grad", "scatter", "scatter_grad", "sum", "sum_grad"):
            assert report[name] == 0.0, name
        assert report["gather_rows"] == 0.0 and report["gather_rows_grad"] == 0.0


@pytest.mark.slow
def test_column_row_parallel_mlp_equals_full_layers(reports: list[dict]) -> None:
    for report in reports:
        fp32 = {k: v for k, v in _checks(report, "mlp_").items() if not k.startswith("mlp_bf16_")}
        assert len(fp32) == 6 and all(v < FP32 for v in fp32.values()), fp32
        bf16 = _checks(report, "mlp_bf16_")  # CPU autocast: the own F.linear path, bf16 rounding
        assert len(bf16) == 6 and all(v < 0.05 for v in bf16.values()), bf16


@pytest.mark.slow
def test_layer_norm_over_split_features(reports: list[dict]) -> None:
    for report in reports:
        norm = _checks(report, "norm_")
        assert norm.pop("norm_sharded_attribute") == 1.0
        assert all(v < FP32 for v in norm.values()), norm


@pytest.mark.slow
def test_clipping_uses_the_norm_of_the_whole_model(reports: list[dict]) -> None:
    for report in reports:
        for name in ("l2", "inf"):
            assert report[f"clip_{name}_norm_value"] > 0.05  # the clip is active
            assert report[f"clip_{name}_norm"] < FP32 and report[f"clip_{name}_grads"] < FP32
        assert report["norm_without_grads"] == 0.0


@pytest.mark.slow
def test_dropout_stream_differs_per_rank_and_leaves_the_default_one(reports: list[dict]) -> None:
    assert reports[0]["forked"] != reports[1]["forked"]
    for report in reports:
        assert report["forked"] != report["forked_again"]  # the stream advances
        assert report["default_untouched"] == 0.0


@pytest.mark.slow
def test_embedding_lookup_split_matches_and_counts_each_gradient_once(reports: list[dict]) -> None:
    for report in reports:
        assert report["lookup_values"] == 0.0 and report["lookup_lengths"] == 0.0
        assert report["lookup_t0_grad_summed"] < FP32 and report["lookup_t1_grad_summed"] < FP32
    # Each rank's tables got gradient from its own samples only, and both ranks had some.
    assert all(report["lookup_t0_grad_own_norm"] > 0 for report in reports)
    # Under TorchRec's gradient division (for tables sharded over the world) the gradient is scaled by TP.
    for report in reports:
        assert report["divided_lookup_values"] == 0.0
        for table in ("t0", "t1"):
            doubled = report[f"divided_lookup_{table}_grad_own_norm"]
            assert abs(doubled - 2 * report[f"lookup_{table}_grad_own_norm"]) < 1e-5 * doubled


def test_shard_of_strided_layout() -> None:
    rows = torch.arange(8)  # two chunks [0..3], [4..7], each in 2 blocks
    assert shard_of(rows, 0, 0, 2, stride=2).tolist() == [0, 1, 4, 5]
    assert shard_of(rows, 0, 1, 2, stride=2).tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="does not split"):
        shard_of(torch.arange(6), 0, 0, 4)


def test_sample_split_is_contiguous_and_balanced() -> None:
    assert sample_split(5, 2) == [0, 3, 5]
    assert sample_split(2, 4) == [0, 1, 2, 2, 2]
