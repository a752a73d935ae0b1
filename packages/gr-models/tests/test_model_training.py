"""Each model learns a planted signal on CPU: its loss falls and its metric rises clearly above chance.

Data: the embedded synthetic generator at easy settings (few items, strong cluster structure). Ranking: a user
clicks items of their preferred cluster, which only the history reveals (2 clusters, chance AUC = 0.5).
Retrieval: the next item stays in the current item's cluster 95% of the time (100 items, chance HR@10 ~ 0.1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gr_models.model import RankingGR, RetrievalGR, SASRec
from gr_models.trainer import Trainer, load_config

COMMON = [
    "train.progress_bar=false",
    "train.eval_every=0",
    "train.log_every=5",
    "train.eval_batches=2",
    "hstu.hidden_size=32",
    "hstu.kv_channels=16",
    "hstu.dropout=0.0",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "data.max_sequence_length=24",
    "optim.learning_rate=0.005",
    "embeddings.default={learning_rate: 0.02}",
]


def _mean(values: list[tuple[int, float]]) -> float:
    return sum(v for _, v in values) / len(values)


def _train(tmp_path: Path, overrides: list[str]) -> tuple[Trainer, dict[str, float], dict[str, float]]:
    trainer = Trainer(load_config(None, [*COMMON, f"output_dir={tmp_path}", *overrides]))
    before = trainer.evaluate()
    result = trainer.train()
    return trainer, before, result.metrics


def _assert_loss_falls(trainer: Trainer, factor: float) -> None:
    losses = trainer.recorder.history["train/loss"]
    first, last = _mean(losses[:2]), _mean(losses[-2:])
    assert last < factor * first, f"training loss went from {first:.3f} to {last:.3f}"


@pytest.mark.slow
def test_ranking_gr_learns_the_planted_click_signal(tmp_path: Path) -> None:
    trainer, before, after = _train(
        tmp_path,
        [
            "data.options={num_users: 512, num_items: 60, num_clusters: 2, clusters_per_user: 1, "
            "min_events: 12, max_events: 30, num_tasks: 1}",
            "data.holdout=4",
            "data.max_train_candidates=4",
            "train.max_steps=40",
        ],
    )
    assert isinstance(trainer.model, RankingGR)
    assert abs(before["auc/click"] - 0.5) < 0.1
    assert after["auc/click"] > 0.7, after
    _assert_loss_falls(trainer, 0.85)


@pytest.mark.parametrize(("model", "model_class"), [("hstu", RetrievalGR), ("sasrec", SASRec)])
@pytest.mark.slow
def test_retrieval_models_learn_next_item_structure(tmp_path: Path, model: str, model_class: type) -> None:
    trainer, before, after = _train(
        tmp_path,
        [
            "task=retrieval",
            f"model={model}",
            "data.options={num_users: 512, num_items: 100, num_clusters: 20, max_events: 30, "
            "follow_previous: 0.95, num_tasks: 1}",
            "retrieval.num_negatives=32",
            "retrieval.eval_top_k=[10]",
            "train.max_steps=40",
        ],
    )
    assert type(trainer.model) is model_class
    chance = 10 / 101
    assert before["hr@10"] < 2 * chance
    assert after["hr@10"] > 3 * chance, after
    assert after["ndcg@10"] > before["ndcg@10"] + 0.1
    _assert_loss_falls(trainer, 0.8)
