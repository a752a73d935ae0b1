"""A small TorchRec model switched from EmbeddingCollection to DynamicEmbeddingCollection in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import DynamicEmbeddingCollection, DynamicEmbOptimizerArgs, DynamicEmbOptimizerType

NUM_ITEMS, DIM, BATCH = 1000, 8, 32
TABLES = [EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=NUM_ITEMS, feature_names=["item"])]
FUSED_ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)


class SequenceClassifier(nn.Module):
    """Averages the item embeddings of each user's sequence and scores it with an MLP."""

    def __init__(self, collection: nn.Module) -> None:
        super().__init__()
        self.collection = collection
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        items = self.collection(features)["item"]
        lengths = items.lengths()
        users = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        pooled = torch.zeros(lengths.numel(), DIM).index_add(0, users, items.values().float())
        return self.mlp(pooled / lengths.clamp(min=1).unsqueeze(1)).squeeze(1)


def _batch(generator: torch.Generator, id_scale: int = 1) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Sequences drawn from the lower (label 0) or upper (label 1) half of the items."""
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    lengths = torch.randint(1, 8, (BATCH,), generator=generator)
    halves = torch.repeat_interleave(labels, lengths)
    ids = torch.randint(0, NUM_ITEMS // 2, (int(lengths.sum()),), generator=generator) + halves * (NUM_ITEMS // 2)
    features = KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids * id_scale, lengths=lengths)
    return features, labels.float()


def _train(model: nn.Module, steps: int, id_scale: int = 1) -> list[float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        features, labels = _batch(generator, id_scale)
        loss = nn.functional.binary_cross_entropy_with_logits(model(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_swapping_embedding_collection_for_the_dynamic_one_is_one_line_and_trains() -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)
    static_model = SequenceClassifier(EmbeddingCollection(tables=TABLES, device=device))
    torch.manual_seed(0)
    dynamic_model = SequenceClassifier(DynamicEmbeddingCollection(tables=TABLES, device=device, optimizer=FUSED_ADAM))
    # The only change is the collection's class (plus its fused optimizer); the dense Adam above
    # trains the MLP, and sees no embedding parameter in the dynamic model.
    assert all("collection" not in name for name, _ in dynamic_model.named_parameters())

    static_losses = _train(static_model, steps=80)
    dynamic_losses = _train(dynamic_model, steps=80)
    first, last = sum(dynamic_losses[:10]) / 10, sum(dynamic_losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert sum(static_losses[-10:]) / 10 < sum(static_losses[:10]) / 10  # the TorchRec model learns too


def test_the_dynamic_model_takes_ids_beyond_num_embeddings() -> None:
    model = SequenceClassifier(DynamicEmbeddingCollection(tables=TABLES, optimizer=FUSED_ADAM))
    losses = _train(model, steps=80, id_scale=1_000_000_007)  # ids up to ~1e12, hashed into the table
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert model.collection.dynamic_embedding_tables()["item_table"].size() <= NUM_ITEMS
