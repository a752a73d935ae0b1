"""Standalone (unsharded) dynamicemb modules in a world of several ranks: save and load refuse them, saying what to
use instead, before anything is written or changed.

The refusal depends only on the world size, so a one-process test stands in for the world of 2 ranks by giving
`gr_checkpoint.dynamic_tables` a `torch.distributed` view of an initialized 2-rank world (the sharded alternative
the message names is tested across world sizes in gr-models' `test_checkpoint_reshard.py`).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import gr_checkpoint
from dynamicemb import DynamicEmbeddingCollection
from gr_checkpoint import dynamic_tables
from gr_checkpoint.dynamic_tables import StandaloneDynamicTablesError

TWO_RANKS = types.SimpleNamespace(is_initialized=lambda: True, get_world_size=lambda group=None: 2)


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = EmbeddingConfig(name="items", embedding_dim=4, num_embeddings=64, feature_names=["item"])
        self.embeddings = DynamicEmbeddingCollection(tables=[config])
        self.head = nn.Linear(4, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.embeddings(features)["item"].values()).squeeze(1)


def _batch(seed: int) -> KeyedJaggedTensor:
    ids = torch.randint(0, 1 << 40, (5,), generator=torch.Generator().manual_seed(seed))
    return KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids, lengths=torch.tensor([2, 3]))


def _trained() -> tuple[Recommender, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Recommender()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
    model(_batch(1)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_in_a_world_of_two_ranks_refuses_standalone_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _trained()
    monkeypatch.setattr(dynamic_tables, "dist", TWO_RANKS)
    with pytest.raises(StandaloneDynamicTablesError, match=r"standalone dynamicemb modules \['embeddings'\].*2 ranks"):
        gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the checkpoint nor its staging folder


def test_load_in_a_world_of_two_ranks_refuses_standalone_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    fresh = Recommender()
    fresh_optimizer = torch.optim.Adam(fresh.head.parameters(), lr=0.01)
    head_before = fresh.head.weight.detach().clone()
    monkeypatch.setattr(dynamic_tables, "dist", TWO_RANKS)
    with pytest.raises(StandaloneDynamicTablesError, match=r"gr_parallel\.distribute"):
        gr_checkpoint.load(tmp_path / "ckpt", fresh, fresh_optimizer)
    assert torch.equal(fresh.head.weight, head_before)
    assert fresh.embeddings.dynamic_embedding_tables()["items"].size() == 0
