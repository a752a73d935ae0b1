"""Full-softmax retrieval loss: equals a brute-force cross-entropy over every item, and a few steps reduce it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gr_models.configs import PositionEncodingConfig, RetrievalConfig, ShardedEmbeddingConfig, get_hstu_config
from gr_models.data.batch import FeatureConfig, RetrievalBatch
from gr_models.model import SASRec
from gr_models.modules.losses import full_softmax_loss
from gr_models.trainer import load_config
from gr_models.trainer.builders import build_model
from gr_models.trainer.optim import OptimizerBundle

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _brute_force(query: torch.Tensor, positive_id: int, items: torch.Tensor, temperature: float) -> float:
    logits = [float(query @ item) / temperature for item in items]
    return math.log(sum(math.exp(x) for x in logits)) - logits[positive_id]


def test_full_softmax_loss_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, items = torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)
    positive_ids = torch.tensor([0, 6, 3, 3, 1])
    losses = full_softmax_loss(queries, positive_ids, items, temperature=0.5)
    for row in range(5):
        expected = _brute_force(queries[row], int(positive_ids[row]), items, 0.5)
        assert losses[row].item() == pytest.approx(expected, rel=1e-5)


def test_full_softmax_loss_rejects_ids_outside_the_table() -> None:
    with pytest.raises(ValueError, match="outside the 3 item embeddings"):
        full_softmax_loss(torch.randn(2, 4), torch.tensor([0, 3]), torch.randn(3, 4), temperature=1.0)


def _model_and_batch() -> tuple[SASRec, RetrievalBatch]:
    torch.manual_seed(0)
    vocab = 13
    hstu = get_hstu_config(8, 8, 1, 1, dropout=0.0, position_encoding=PositionEncodingConfig(count_from="start"))
    table = ShardedEmbeddingConfig(feature_names=["item_id"], table_name="item_id_table", vocab_size=vocab, dim=8)
    model = SASRec(hstu, RetrievalConfig(embedding_configs=[table], loss="full_softmax", temperature=0.2), "cpu")
    batch = RetrievalBatch.random(
        batch_size=4, feature_configs=[FeatureConfig(["item_id"], [vocab], 9, True)], item_feature_name="item_id",
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    return model, batch


def test_model_loss_is_the_cross_entropy_over_every_item() -> None:
    model, batch = _model_and_batch()
    losses, (queries, positive_ids) = model(batch)
    items = model.all_item_embeddings("item_id").detach()
    assert losses.shape == positive_ids.shape and len(losses) > 4
    for row in range(len(losses)):
        expected = _brute_force(queries[row], int(positive_ids[row]), items, 0.2)
        assert losses[row].item() == pytest.approx(expected, rel=1e-4)


def test_a_few_steps_reduce_the_full_softmax_loss() -> None:
    model, batch = _model_and_batch()
    from gr_models.trainer.config import OptimSection

    bundle = OptimizerBundle(model, OptimSection(learning_rate=0.01, grad_clip=None), 20)
    first = model(batch)[0].mean().item()
    for _ in range(20):
        model(batch)[0].mean().backward()
        for optimizer in bundle.optimizers:
            optimizer.step()
        bundle.zero_grad()
    last = model(batch)[0].mean().item()
    assert last < 0.8 * first, (first, last)


def test_full_softmax_config_builds_sasrec_with_that_loss() -> None:
    config = load_config(CONFIGS / "ml1m_retrieval_sasrec_full_softmax.yaml")
    sasrec = load_config(CONFIGS / "ml1m_retrieval_sasrec.yaml")
    assert config.retrieval.loss == "full_softmax" and sasrec.retrieval.loss == "sampled_softmax"
    assert config.hstu == sasrec.hstu and config.optim == sasrec.optim and config.embeddings == sasrec.embeddings
    from gr_models.data.schema import DatasetSchema

    schema = DatasetSchema(kind="retrieval", item_feature_name="item_id", vocab_sizes={"item_id": 20},
                           max_sequence_length=10)  # fmt: skip
    model = build_model(config, schema, torch.device("cpu"))
    assert isinstance(model, SASRec) and model.task_config.loss == "full_softmax"


def test_unknown_loss_is_refused() -> None:
    table = ShardedEmbeddingConfig(feature_names=["item_id"], table_name="item_id_table", vocab_size=5, dim=8)
    with pytest.raises(ValueError, match="loss must be one of"):
        RetrievalConfig(embedding_configs=[table], loss="softmax")
