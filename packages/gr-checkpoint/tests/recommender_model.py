"""A small recommender with dynamic tables, and exact copies of everything a load may change
(shared by the integrity and asynchronous-save tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import DynamicEmbeddingCollection, DynamicEmbOptimizerArgs, DynamicEmbOptimizerType

ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)


class Recommender(nn.Module):
    """Dynamic item and user tables (fused Adam), a buffer and a dense head (Adam)."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.embeddings = DynamicEmbeddingCollection(
            tables=[
                EmbeddingConfig(name="items", embedding_dim=4, num_embeddings=64, feature_names=["item"]),
                EmbeddingConfig(name="users", embedding_dim=4, num_embeddings=64, feature_names=["user"]),
            ],
            optimizer=ADAM,
        )
        self.hidden = nn.Linear(8, hidden)
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        out = self.embeddings(features)
        self.calls += 1
        joined = torch.cat([out["item"].values(), out["user"].values()], dim=1)
        return self.head(torch.tanh(self.hidden(joined))).squeeze(1)


def batch(seed: int) -> KeyedJaggedTensor:
    ids = torch.randint(0, 1 << 40, (8,), generator=torch.Generator().manual_seed(seed))
    return KeyedJaggedTensor.from_lengths_sync(keys=["item", "user"], values=ids, lengths=torch.tensor([2, 2, 2, 2]))


def trained(seed: int, steps: int = 3, hidden: int = 6) -> tuple[Recommender, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Recommender(hidden)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("embeddings")], lr=0.01)
    for step in range(steps):
        optimizer.zero_grad()
        model(batch(100 * seed + step)).sigmoid().sum().backward()
        optimizer.step()
    return model, optimizer


def snapshot(model: Recommender, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a load may change, as exact copies."""
    rows = {
        name: sorted(
            (key, embedding.tolist(), state.tolist(), score)
            for keys, embeddings, states, scores in table.export()
            for key, embedding, state, score in zip(keys.tolist(), embeddings, states, scores.tolist())
        )
        for name, table in model.embeddings.dynamic_embedding_tables().items()
    }
    steps = {name: table.optimizer.step for name, table in model.embeddings.dynamic_embedding_tables().items()}
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": clone(optimizer.state_dict()),
        "rows": rows,
        "table_steps": steps,
    }


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b
