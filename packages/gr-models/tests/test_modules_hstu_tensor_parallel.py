"""HSTU layers split over tensor-parallel gloo ranks equal the one-rank layers: 2 TP ranks against one, and a
whole distributed model on 2 DP x 2 TP ranks against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
FP32 = 2e-5


pytestmark = pytest.mark.slow  # torchrun tensor-parallel runs


def _torchrun(worker: str, nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    run = subprocess.run(
        [*command, str(TESTS / worker), *args],
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("hstu_tp")
    _torchrun("hstu_tensor_parallel_worker.py", 2, str(out_dir))
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_layers_are_split_by_heads_with_the_one_rank_parameter_names(reports: list[dict]) -> None:
    for report in reports:
        assert report["layer_type"] == report["block_layer_type"] == "TensorParallelHSTULayer"
        assert report["is_hstu_layer"] and report["same_state_keys"]
        assert report["local_uvqk_rows"] == 4 * 2 * 4  # u, v, q, k of 2 of 4 heads, head_dim 4
        assert report["local_output_columns"] == 2 * 4


@pytest.mark.parametrize("variant", ["fp32", "recompute"])
def test_forward_gradients_clipping_and_updates_equal_one_rank(reports: list[dict], variant: str) -> None:
    for report in reports:
        result = report[variant]
        assert result["init"] == 0.0  # each rank keeps slices of the one-rank initialization
        for name in ("output", "input_grad", "param_grads", "updated_params"):
            assert result[name] < FP32, (name, result[name])
        for step in range(3):
            assert result[f"clip_norm_value_step{step}"] > 0.5  # clipping is active
            assert result[f"clip_norm_step{step}"] < 1e-6 * result[f"clip_norm_value_step{step}"]


def test_bf16_autocast_matches_within_bf16_rounding(reports: list[dict]) -> None:
    for report in reports:
        result = report["bf16"]
        assert result["output"] < 0.02
        assert result["input_grad"] < 0.02 * result["input_grad_scale"]
        assert result["param_grads"] < 0.02 * result["param_grad_scale"]


def test_dropout_in_split_layers_keeps_ranks_consistent(reports: list[dict]) -> None:
    for report in reports:
        assert report["dropout_train_vs_eval"] > 0.0  # dropout was applied in training
        assert report["dropout_ranks_agree"] == 0.0  # the row-parallel output is the same on both ranks


def test_head_count_not_divisible_by_tp_size_is_a_clear_error(reports: list[dict]) -> None:
    for report in reports:
        assert "num_attention_heads=3 is not divisible by the tensor-parallel size 2" in report["bad_heads_error"]


def test_options_without_a_tensor_parallel_form_are_refused_when_the_layer_is_built(reports: list[dict]) -> None:
    for report in reports:
        assert "layer_norm_affine=False / uvqk_bias=False are not implemented" in report["plain_norm_error"]
        assert "query_time='next_token' is not implemented with tensor parallelism" in report["next_token_error"]


def test_data_and_tensor_parallel_model_matches_one_process(tmp_path: Path) -> None:
    """distribute() + lookup_split_over_tensor_parallel + TP HSTU layers + clip_grad_norm_ on 2 DP x 2 TP ranks:
    losses, clipped norms, dense parameters (TP shards reassembled) and the row-sharded item table after 3 steps
    equal one process on the same global batches."""
    results = {}
    for nproc, tp_size in ((1, 1), (4, 2)):
        out_dir = tmp_path / f"world{nproc}"
        out_dir.mkdir()
        _torchrun("hybrid_parallel_worker.py", nproc, str(out_dir), str(tp_size))
        results[nproc] = json.loads((out_dir / "result.json").read_text())
    one, hybrid = results[1], results[4]
    assert (hybrid["dp_size"], hybrid["tp_size"]) == (2, 2)
    assert torch.allclose(torch.tensor(hybrid["losses"]), torch.tensor(one["losses"]), atol=FP32)
    assert torch.allclose(torch.tensor(hybrid["norms"]), torch.tensor(one["norms"]), rtol=1e-5)
    assert sum(norm > 0.3 for norm in one["norms"]) >= 2  # clipping was active
    assert hybrid["dense"].keys() == one["dense"].keys()
    for name, values in one["dense"].items():
        assert torch.allclose(torch.tensor(hybrid["dense"][name]), torch.tensor(values), atol=FP32), name
    initial = torch.arange(32 * 8, dtype=torch.float32).view(32, 8) / 300
    assert not torch.allclose(torch.tensor(one["items"]), initial)  # the table trained
    assert torch.allclose(torch.tensor(hybrid["items"]), torch.tensor(one["items"]), atol=FP32)
