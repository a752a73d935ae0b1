"""MLP prediction heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """`Linear -> act -> ... -> Linear`: widths `layer_sizes`, no activation after the last layer."""

    def __init__(self, in_size: int, layer_sizes: Sequence[int], activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {list(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_size
        for i, size in enumerate(layer_sizes):
            layers.append(nn.Linear(width, size, bias=bias))
            if i < len(layer_sizes) - 1:
                layers.append(_ACTIVATIONS[activation]())
            width = size
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiTaskHead(nn.Module):
    """Per-token logits `[N, num_tasks]` from hidden states `[N, hidden]`.

    `arch` is one MLP (list of ints ending in num_tasks) or one MLP per task (list of int lists ending in 1).
    """

    def __init__(
        self, in_size: int, arch: Sequence[int] | Sequence[Sequence[int]], activation: str, bias: bool
    ) -> None:
        super().__init__()
        if all(isinstance(a, int) for a in arch):
            self.heads = nn.ModuleList([MLP(in_size, list(arch), activation, bias)])  # type: ignore[arg-type]
        else:
            self.heads = nn.ModuleList(MLP(in_size, list(a), activation, bias) for a in arch)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)
