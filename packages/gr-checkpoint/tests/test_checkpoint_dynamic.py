"""Models holding dynamicemb tables: tables go to dynamicemb_module/, the rest to torch_module/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import gr_checkpoint
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)
from gr_checkpoint import CheckpointMismatchError

Trained = tuple["Recommender", torch.optim.Optimizer]
ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
STEP_SCORES = DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.STEP)


class CollectionWithMarker(DynamicEmbeddingCollection):
    """A dynamic module that also carries ordinary module state (as a mixed sharded collection
    carries TorchRec tables): that state belongs in torch_module/, the tables in dynamicemb_module/."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("marker", torch.zeros(3))


class Recommender(nn.Module):
    """A dynamic item table, a dynamic user table and a dense head trained with a dense Adam."""

    def __init__(self, item_dim: int = 4, collection: type[DynamicEmbeddingCollection] = DynamicEmbeddingCollection):
        super().__init__()
        self.embeddings = collection(
            tables=[
                EmbeddingConfig(name="items", embedding_dim=item_dim, num_embeddings=256, feature_names=["item"]),
                EmbeddingConfig(name="users", embedding_dim=4, num_embeddings=256, feature_names=["user"]),
            ],
            table_options=STEP_SCORES,
            optimizer=ADAM,
        )
        self.head = nn.Linear(item_dim + 4, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        out = self.embeddings(features)
        items, users = out["item"].values(), out["user"].values()
        return self.head(torch.cat([items, users], dim=1)).squeeze(1)


def _batch(seed: int) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1 << 40, (10,), generator=generator)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "user"], values=torch.cat([ids[:5], ids[5:]]), lengths=torch.tensor([2, 3, 3, 2])
    )


def _train(model: Recommender, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        optimizer.zero_grad()
        model(_batch(seed)).sigmoid().sum().backward()
        optimizer.step()


def _rows(model: Recommender) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    return {
        name: {
            key: (embedding.tolist(), state.tolist())
            for keys, embeddings, states, _ in table.export()
            for key, embedding, state in zip(keys.tolist(), embeddings, states)
        }
        for name, table in model.embeddings.dynamic_embedding_tables().items()
    }


def _fresh(**kwargs: Any) -> tuple[Recommender, torch.optim.Optimizer]:
    torch.manual_seed(123)
    model = Recommender(**kwargs)
    return model, torch.optim.Adam(model.head.parameters(), lr=0.02)


@pytest.fixture
def trained() -> Trained:
    torch.manual_seed(0)
    model = Recommender()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.02)
    _train(model, optimizer, range(4))
    return model, optimizer


def test_round_trip_of_dynamic_tables_dense_part_and_both_optimizers(tmp_path: Path, trained: Trained) -> None:
    model, optimizer = trained
    rng_at_save = torch.get_rng_state()  # new rows draw their initial values from the global RNG
    path = gr_checkpoint.save(tmp_path / "ckpt", model, optimizer, extra_state={"step": 4, "rng": rng_at_save})

    assert sorted(os.listdir(path)) == ["dynamicemb_module", "extra_state.pt", "manifest.json", "torch_module"]
    assert sorted(os.listdir(path / "dynamicemb_module" / "embeddings")) == ["items.dynamicemb", "users.dynamicemb"]
    manifest = gr_checkpoint.read_manifest(path)
    assert manifest.dynamic_tables == {
        "embeddings": {
            "items": gr_checkpoint.DynamicTableSpec(4, "float32"),
            "users": gr_checkpoint.DynamicTableSpec(4, "float32"),
        }
    }
    assert set(manifest.model_tensors) == {"head.weight", "head.bias"}

    restored, restored_optimizer = _fresh()
    extra = gr_checkpoint.load(path, restored, restored_optimizer)
    assert extra["step"] == 4
    assert _rows(restored) == _rows(model)
    assert len(_rows(model)["items"]) == 20
    assert torch.equal(restored.head.weight, model.head.weight)

    # Dense Adam, the tables' fused Adam (state and step) and, through extra_state, the RNG that
    # initializes new rows all resume exactly.
    assert torch.equal(extra["rng"], rng_at_save)
    torch.set_rng_state(rng_at_save)
    _train(model, optimizer, range(10, 13))
    torch.set_rng_state(extra["rng"])
    _train(restored, restored_optimizer, range(10, 13))
    assert _rows(restored) == _rows(model)
    assert torch.equal(restored.head.weight, model.head.weight)
    restored.eval()
    model.eval()
    assert torch.equal(restored(_batch(99)), model(_batch(99)))


def test_dynamic_table_dim_mismatch_is_named(tmp_path: Path, trained: Trained) -> None:
    model, optimizer = trained
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    wider, wider_optimizer = _fresh(item_dim=6)
    with pytest.raises(
        CheckpointMismatchError,
        match="dynamic table embeddings/items: checkpoint has dim 4 float32, model has dim 6 float32",
    ):
        gr_checkpoint.load(tmp_path / "ckpt", wider, wider_optimizer)
    assert _rows(wider) == {"items": {}, "users": {}}


def test_dynamic_tables_missing_from_the_model_are_named(tmp_path: Path, trained: Trained) -> None:
    model, _ = trained
    gr_checkpoint.save(tmp_path / "ckpt", model)
    dense_only = nn.Module()
    dense_only.head = nn.Linear(8, 1)
    with pytest.raises(CheckpointMismatchError, match="embeddings/items is in the checkpoint but not in the model"):
        gr_checkpoint.load(tmp_path / "ckpt", dense_only)


def test_ordinary_state_of_a_dynamic_module_goes_to_torch_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Recommender(collection=CollectionWithMarker)
    _train(model, torch.optim.SGD(model.head.parameters(), lr=0.1), range(2))
    model.embeddings.marker += torch.tensor([1.0, 2.0, 3.0])

    gr_checkpoint.save(tmp_path / "ckpt", model)
    manifest = gr_checkpoint.read_manifest(tmp_path / "ckpt")
    assert set(manifest.model_tensors) == {"embeddings.marker", "head.weight", "head.bias"}
    assert set(manifest.dynamic_tables["embeddings"]) == {"items", "users"}
    restored = Recommender(collection=CollectionWithMarker)
    gr_checkpoint.load(tmp_path / "ckpt", restored)
    assert _rows(restored) == _rows(model)
    assert restored.embeddings.marker.tolist() == [1.0, 2.0, 3.0]
