"""`gr-train` resumed under `torchrun --nproc_per_node 2` (gloo, CPU), at the same and at another number of ranks.

Same size: a 2-rank run with dropout (each data-parallel rank draws its own masks) saves a checkpoint every step
(`train.keep_last=3` keeps the last three); with the checkpoints after step 3 deleted, as if it had been killed
then, `gr-train --resume` on 2 ranks (under another `name`, the one config difference, which is logged) gives the
losses of the uninterrupted run: every rank's RNG stream, the data position, dense and fused optimizer states came
back.

Another size: a one-process run's (batch 16) checkpoint of step 3 resumes on 2 ranks (batch 8 each, balanced
global batches of the same 16 users), whose checkpoint of step 4 resumes in one process again for steps 5 and 6;
both give the losses of the uninterrupted one-process run, as 2 ranks and one process train alike on the same
global batches (`test_trainer_distributed.py`). Without dropout, since the ranks' random streams differ from
one process's. The model-parallel static tables' row-wise AdaGrad state passes between gr-models' row optimizers
(unsharded, one process) and TorchRec's fused optimizers (sharded, 2 ranks), both ways; the dynamic item table's
Adam state through dynamicemb's resharding dump.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gr_checkpoint import read_manifest
from gr_models.cli import main
from gr_models.trainer import Trainer, load_config

CONFIG = """
name: resume
task: ranking
device: cpu
seed: 7
data:
  dataset: synthetic
  options: {num_users: 48, num_items: 40, num_clusters: 2, min_events: 6, max_events: 12, num_tasks: 2}
  max_sequence_length: 10
  holdout: 2
  max_train_candidates: 2
  eval_batch_size: 16
hstu: {hidden_size: 8, kv_channels: 4, num_attention_heads: 2, num_layers: 1, dropout: 0.0}
embeddings:
  default: {type: static, optimizer: rowwise_adagrad, learning_rate: 0.05}
  tables: {item_id: {type: dynamic, optimizer: adam, initializer: constant, init_value: 0.05}}
optim: {learning_rate: 3e-3, warmup_steps: 2}
train: {eval_every: 0, log_every: 1, progress_bar: false, eval_batches: 1}
parallel: {balance_sequences: true}
"""
STEPS, SAVED_AT = 5, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gr_train_on_two_ranks(config: Path, overrides: list[str], cwd: Path) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "gr_models.cli", "--config", str(config), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run.stdout + run.stderr


def _losses(run_dir: Path) -> list[float]:
    record = json.loads((run_dir / "metrics.json").read_text())
    return [value for _, value in record["history"]["train/loss"]]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "resume.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.slow
def test_resume_on_two_ranks_continues_like_an_uninterrupted_run(config_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["data.batch_size=8", "hstu.dropout=0.2", f"output_dir={run_dir}", f"train.max_steps={STEPS}"]
    _gr_train_on_two_ranks(config_file, [*common, "train.checkpoint_every=1", "train.keep_last=3"], tmp_path)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_3", "step_4", "step_5"]
    straight = _losses(run_dir)
    assert len(straight) == STEPS
    for step in range(SAVED_AT + 1, STEPS + 1):  # as if the run had been killed after saving step 3
        shutil.rmtree(checkpoints / f"step_{step}")

    output = _gr_train_on_two_ranks(config_file, ["--resume", *common, "name=renamed"], tmp_path)
    checkpoint = checkpoints / f"step_{SAVED_AT}"
    assert f"resumed from {checkpoint} at step {SAVED_AT} (saved by 2 processes, tensor parallel 1; now 2" in output
    assert "name: 'resume' -> 'renamed'" in output
    assert "train.checkpoint_every" not in output  # how often a run saves is not a difference worth a warning
    assert _losses(run_dir) == pytest.approx(straight, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_checkpoints_resume_from_one_process_on_two_ranks_and_back(config_file: Path, tmp_path: Path) -> None:
    def one_process(output_dir: Path, checkpoint_every: int) -> Trainer:
        overrides = [f"output_dir={output_dir}", "data.batch_size=16", f"train.max_steps={STEPS + 1}"]
        trainer = Trainer(load_config(config_file, [*overrides, f"train.checkpoint_every={checkpoint_every}"]))
        trainer.train()
        return trainer

    one = one_process(tmp_path / "one", checkpoint_every=SAVED_AT)
    straight = _losses(one.run_dir)
    two = tmp_path / "two"
    shutil.copytree(one.run_dir / "checkpoints" / f"step_{SAVED_AT}", two / "checkpoints" / f"step_{SAVED_AT}")

    overrides = [f"output_dir={two}", "data.batch_size=8", f"train.max_steps={STEPS + 1}", "train.checkpoint_every=4"]
    output = _gr_train_on_two_ranks(config_file, overrides, tmp_path)
    assert f"at step {SAVED_AT} (saved by 1 processes, tensor parallel 1; now 2, tensor parallel 1)" in output
    assert "data.batch_size: 16 -> 8" in output
    assert _losses(two) == pytest.approx(straight, rel=1e-5, abs=1e-6)

    # the 2-rank run's step-4 checkpoint resumed in one process: its last loss depends on the optimizer states
    back = tmp_path / "back"
    shutil.copytree(two / "checkpoints" / "step_4", back / "checkpoints" / "step_4")
    assert _losses(one_process(back, checkpoint_every=0).run_dir) == pytest.approx(straight, rel=1e-5, abs=1e-6)


def test_resume_flag_without_a_checkpoint_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--resume", f"output_dir={tmp_path / 'new'}"]) == 2
    assert f"--resume: no complete checkpoint under {tmp_path / 'new' / 'checkpoints'}" in capsys.readouterr().err


def test_a_tensor_parallel_size_the_model_cannot_take_is_refused(tmp_path: Path) -> None:
    config = load_config(
        None, [f"output_dir={tmp_path}", "hstu.num_attention_heads=3", "parallel.tensor_model_parallel_size=2"]
    )
    with pytest.raises(
        ValueError, match=r"tensor_model_parallel_size=2 does not divide hstu.num_attention_heads=3.*\[1, 3\]"
    ):
        Trainer(config)


@pytest.mark.slow
def test_resume_on_two_tensor_parallel_ranks_continues_like_an_uninterrupted_run(
    config_file: Path, tmp_path: Path
) -> None:
    """One data-parallel rank of 2 tensor-parallel ranks (a head each), dropout inside the split layers drawn from
    each rank's tensor-parallel stream, which the checkpoint carries; split parameters saved by global shape."""
    run_dir = tmp_path / "run"
    common = ["data.batch_size=16", "hstu.dropout=0.2", "parallel.tensor_model_parallel_size=2"]
    common += [f"output_dir={run_dir}", f"train.max_steps={STEPS}"]
    _gr_train_on_two_ranks(config_file, [*common, "train.checkpoint_every=1"], tmp_path)
    checkpoints = run_dir / "checkpoints"
    manifest = read_manifest(checkpoints / f"step_{SAVED_AT}")
    assert manifest.model_tensors["hstu_block.layers.0.uvqk.weight"].shape == (32, 8)  # 2 heads x (u, v, q, k) x 4
    straight = _losses(run_dir)
    for step in range(SAVED_AT + 1, STEPS + 1):
        shutil.rmtree(checkpoints / f"step_{step}")

    output = _gr_train_on_two_ranks(config_file, ["--resume", *common], tmp_path)
    assert f"at step {SAVED_AT} (saved by 2 processes, tensor parallel 2; now 2, tensor parallel 2)" in output
    assert _losses(run_dir) == pytest.approx(straight, rel=1e-6, abs=1e-7)
