"""`gr-train` under `torchrun --nproc_per_node 2` (gloo, CPU) against one process on the same global batches.

The 2 data-parallel ranks read `data.batch_size` users each per step; the one-process run reads twice as many, the
same users (each global batch is the next 2 x `data.batch_size` users of the shuffled order, split across the
ranks by attention cost with `parallel.balance_sequences`). The loss is the mean over the global batch, so the
logged losses, the updates and the final metrics over the whole evaluation split must agree, with the overlap
pipeline on, and also with 2 tensor-parallel ranks per data-parallel rank (4 processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gr_checkpoint import read_manifest
from gr_models.cli import main

CONFIG = """
name: dp
task: ranking
device: cpu
data:
  dataset: synthetic
  options: {num_users: 67, num_items: 40, num_clusters: 2, min_events: 8, max_events: 16, num_tasks: 2}
  max_sequence_length: 12
  holdout: 2
  max_train_candidates: 2
  eval_batch_size: 11
hstu: {hidden_size: 16, kv_channels: 8, num_attention_heads: 2, num_layers: 1, dropout: 0.0}
embeddings:
  default: {type: static, optimizer: rowwise_adagrad, learning_rate: 0.05}
  tables: {item_id: {type: dynamic, initializer: constant, init_value: 0.05}, action: {sharding_type: data_parallel}}
optim: {learning_rate: 3e-3, warmup_steps: 1, schedule: linear}
train: {max_steps: 3, eval_every: 0, log_every: 1, progress_bar: false}
"""
PER_RANK_BATCH = 8


pytestmark = pytest.mark.slow  # gr-train under torchrun on 2 and 4 ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "gr_models.cli", *args,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _history(record: dict, tag: str) -> list[float]:
    return [value for _, value in record["history"][tag]]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The config file and the record of a one-process run with batch 2 x PER_RANK_BATCH."""
    folder = tmp_path_factory.mktemp("gr_train")
    config = folder / "dp.yaml"
    config.write_text(CONFIG)
    args = ["--config", str(config), f"output_dir={folder / 'one'}", f"data.batch_size={2 * PER_RANK_BATCH}"]
    assert main(args) == 0
    return config, json.loads((folder / "one" / "metrics.json").read_text())


def _assert_same_training(one: dict, other: dict) -> None:
    assert _history(other, "train/loss") == pytest.approx(_history(one, "train/loss"), rel=1e-5, abs=1e-6)
    assert set(other["metrics"]) == set(one["metrics"])
    for name, value in one["metrics"].items():
        assert other["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert other["throughput"]["samples"] == one["throughput"]["samples"] == 3 * 2 * PER_RANK_BATCH


def test_gr_train_on_two_data_parallel_ranks_matches_one_process(
    one_process: tuple[Path, dict], tmp_path: Path
) -> None:
    config, one = one_process
    two_dir = tmp_path / "two"
    args = [
        f"output_dir={two_dir}",
        f"data.batch_size={PER_RANK_BATCH}",
        "train.checkpoint_every=3",
        "parallel.pipeline=overlap",
        "parallel.balance_sequences=true",
    ]
    run = _torchrun(2, ["--config", str(config), *args], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert run.stdout.count("final metrics after 3 steps") == 1  # printed by rank 0 only
    assert "2 processes (tensor parallel 1)" in run.stdout
    # fused rowwise AdaGrad runs in fbgemm's CPU TBE, so the static model-parallel tables are split too
    assert "embedding tables: sharded ['item_id_table', 'user_id_table', 'user_segment_table']; " in run.stdout
    assert "replicated ['action_table']" in run.stdout

    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["world_size"] == 2
    # the overlap pipeline started the id all-to-alls of the 3 sharded tables ahead for the 2 batches after the first
    assert two["pipeline"] == {"kind": "overlap", "lookups_distributed_ahead": 3 * 2}
    _assert_same_training(one, two)
    assert len(list((two_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # one checkpoint written by both ranks together: sharded tables, their fused optimizer state, dynamic rows
    manifest = read_manifest(two_dir / "checkpoints" / "step_3")
    assert manifest.world_size == 2 and manifest.step == 3
    assert manifest.sparse_optimizer_tensors and set(manifest.dynamic_tables) == {"embedding.dynamic.item_id_table"}


def test_gr_train_on_two_data_parallel_by_two_tensor_parallel_ranks_matches_one_process(
    one_process: tuple[Path, dict], tmp_path: Path
) -> None:
    """4 processes: 2 data-parallel ranks of 2 tensor-parallel ranks each (one HSTU head per rank; each tensor-parallel
    rank looks up half of its group's samples in the sharded tables)."""
    config, one = one_process
    args = [
        f"output_dir={tmp_path / 'dptp'}",
        f"data.batch_size={PER_RANK_BATCH}",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline=overlap",
        "parallel.balance_sequences=true",
    ]
    run = _torchrun(4, ["--config", str(config), *args], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "4 processes (tensor parallel 2)" in run.stdout
    record = json.loads((tmp_path / "dptp" / "metrics.json").read_text())
    assert record["tensor_model_parallel_size"] == 2
    _assert_same_training(one, record)
