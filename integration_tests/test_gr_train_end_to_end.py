"""A ranking GR trained end to end with `gr-train` under `torchrun` (gloo, CPU), as users run it.

The model has contextual features (`user_id`, `user_segment`), an item feature and an action feature: the item
table is a dynamicemb hash table sharded over the ranks, the user tables are static model-parallel tables sharded
row-wise by TorchRec (row-wise AdaGrad, which the CPU fbgemm can train), and the action table is data-parallel.

* 2 data-parallel ranks: the loss falls and both tasks' AUC is clearly above chance after 80 steps.
* The same run checkpointing every 20 steps, killed (SIGKILL to torchrun and both workers) once a
  checkpoint is complete, then resumed with `--resume`: the losses after the resume point equal the uninterrupted
  run's, and no half-written checkpoint is picked up.
* The same model with its HSTU layers split over 2 tensor-parallel ranks (one data-parallel rank) learns too.

Calibration (2026-12-06, 2 CPU cores): AUC click .73 / quality_1 .76 after 80 steps, loss .67 -> .45; the
asserted margins (AUC > .62, last-10-step loss 15% below the first 10) leave room for other seeds' noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gr_checkpoint import latest_checkpoint

STEPS = 80
CHECKPOINT_EVERY = 20
CONFIG = f"""
name: e2e
task: ranking
device: cpu
seed: 11
data:
  dataset: synthetic
  options: {{num_users: 1024, num_items: 200, num_clusters: 4, clusters_per_user: 1, min_events: 12,
             max_events: 40, num_tasks: 2}}
  max_sequence_length: 32
  holdout: 4
  max_train_candidates: 4
  batch_size: 32
  eval_batch_size: 128
hstu: {{hidden_size: 32, kv_channels: 16, num_attention_heads: 2, num_layers: 2, dropout: 0.1}}
embeddings:
  default: {{type: static, optimizer: rowwise_adagrad, learning_rate: 0.05}}
  tables:
    item_id: {{type: dynamic, optimizer: adam, learning_rate: 0.01}}
    action: {{sharding_type: data_parallel, optimizer: adam, learning_rate: 0.01}}
ranking: {{prediction_head_hidden: [64]}}
optim: {{optimizer: adamw, learning_rate: 0.003, weight_decay: 0.01, warmup_steps: 10, schedule: cosine,
        min_lr_ratio: 0.1, grad_clip: 1.0}}
train: {{max_steps: {STEPS}, eval_every: 0, eval_batches: 4, log_every: 1, progress_bar: false}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(config: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "gr_models.cli", "--config", str(config), *overrides,
    ]  # fmt: skip


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _gr_train(config: Path, overrides: list[str]) -> str:
    run = subprocess.run(_torchrun(config, overrides), env=ENV, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run.stdout + run.stderr


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _losses(run_dir: Path) -> dict[int, float]:
    return {int(step): value for step, value in _record(run_dir)["history"]["train/loss"]}


def _assert_learned(run_dir: Path) -> None:
    record = _record(run_dir)
    losses = [value for _, value in sorted(_losses(run_dir).items())]
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    for task in ("click", "quality_1"):
        assert record["metrics"][f"auc/{task}"] > 0.62, record["metrics"]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e") / "e2e.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def uninterrupted(config: Path) -> Path:
    run_dir = config.parent / "uninterrupted"
    output = _gr_train(config, [f"output_dir={run_dir}"])
    assert "2 processes (tensor parallel 1)" in output
    placement = next(line for line in output.splitlines() if "embedding tables:" in line)
    assert "sharded ['item_id_table', 'user_id_table', 'user_segment_table']" in placement, placement
    assert "replicated ['action_table']" in placement, placement
    return run_dir


def test_two_ranks_learn(uninterrupted: Path) -> None:
    _assert_learned(uninterrupted)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc: torchrun starts its workers in sessions of their own, so
    killing torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _train_until_killed(config: Path, run_dir: Path) -> int:
    """Start the run, SIGKILL torchrun and its workers at once when a checkpoint is complete; the step it holds."""
    overrides = [f"output_dir={run_dir}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_last=2"]
    with open(run_dir.parent / "killed.log", "w") as log:
        process = subprocess.Popen(
            _torchrun(config, overrides), env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        try:
            while latest_checkpoint(run_dir / "checkpoints") is None:
                assert process.poll() is None, (run_dir.parent / "killed.log").read_text()[-5000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
        finally:
            for pid in reversed(_process_tree(process.pid)):  # the workers first, then torchrun
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None
    return int(newest.name.removeprefix("step_"))


def test_killed_run_resumes_with_the_uninterrupted_losses(config: Path, uninterrupted: Path) -> None:
    run_dir = config.parent / "killed"
    saved_at = _train_until_killed(config, run_dir)
    assert saved_at % CHECKPOINT_EVERY == 0 and 0 < saved_at < STEPS

    output = _gr_train(config, ["--resume", f"output_dir={run_dir}"])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved_at}'} at step {saved_at}" in output
    straight, resumed = _losses(uninterrupted), _losses(run_dir)
    after = [step for step in straight if step > saved_at]
    assert after and all(step in resumed for step in after)
    assert [resumed[step] for step in after] == pytest.approx([straight[step] for step in after], rel=1e-5, abs=1e-6)
    assert _record(run_dir)["metrics"] == pytest.approx(_record(uninterrupted)["metrics"], rel=1e-4, abs=1e-5)


def test_tensor_parallel_ranks_learn(config: Path) -> None:
    run_dir = config.parent / "tensor_parallel"
    output = _gr_train(config, [f"output_dir={run_dir}", "parallel.tensor_model_parallel_size=2"])
    assert "2 processes (tensor parallel 2)" in output
    _assert_learned(run_dir)
