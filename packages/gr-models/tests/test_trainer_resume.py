"""Checkpoints through gr_checkpoint: a resumed run continues exactly where the saved one stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gr_models.trainer import Trainer, load_config


def _config(output_dir: Path, max_steps: int, checkpoint_every: int):
    return load_config(
        None,
        [
            f"output_dir={output_dir}",
            "train.progress_bar=false",
            "train.eval_every=0",
            "train.log_every=1",
            "train.eval_batches=1",
            f"train.max_steps={max_steps}",
            f"train.checkpoint_every={checkpoint_every}",
            "hstu.hidden_size=16",
            "hstu.kv_channels=8",
            "hstu.dropout=0.1",
            "data.batch_size=8",
            "data.eval_batch_size=32",
            "data.max_sequence_length=12",
            "data.holdout=2",
            "data.max_train_candidates=2",
            # 40 users = 5 batches per epoch, so the runs below cross an epoch boundary
            "data.options={num_users: 40, num_items: 30, num_clusters: 3, min_events: 6, max_events: 16}",
            "embeddings.tables={item_id: {type: dynamic}}",
            "optim.warmup_steps=2",
            "optim.schedule=cosine",
        ],
    )


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, plus the rows of the dynamic item table (looked up in eval mode, which never inserts)."""
    state = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.model.eval()
    ids = torch.arange(31)
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=ids, lengths=torch.tensor([ids.numel()]))
    state["dynamic item rows"] = trainer.model.embedding.lookup(features, ["item_id"])["item_id"].values().clone()
    return state


class _Crash(Exception):
    pass


class _CrashingTrainer(Trainer):
    """Dies right after writing its first checkpoint, like a job killed mid-run."""

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint()
        raise _Crash(path)


def test_a_crashed_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    straight = Trainer(_config(tmp_path / "straight", max_steps=7, checkpoint_every=0))
    straight.train()

    crashing = _CrashingTrainer(_config(tmp_path / "resumed", max_steps=7, checkpoint_every=4))
    with pytest.raises(_Crash):
        crashing.train()
    assert crashing.latest_checkpoint() is not None and crashing.latest_checkpoint().name == "step_4"

    resumed = Trainer(_config(tmp_path / "resumed", max_steps=7, checkpoint_every=0))
    result = resumed.train()
    assert result.step == 7
    losses = [v for _, v in resumed.recorder.history["train/loss"]]
    assert len(losses) == 7  # the history of the checkpoint plus three new steps
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor([v for _, v in straight.recorder.history["train/loss"]]), rtol=0, atol=0
    )
    expected, got = _state(straight), _state(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_false_starts_over(tmp_path: Path) -> None:
    Trainer(_config(tmp_path, max_steps=2, checkpoint_every=2)).train()
    config = _config(tmp_path, max_steps=1, checkpoint_every=0)
    config.train.resume = False
    assert Trainer(config).train().step == 1
