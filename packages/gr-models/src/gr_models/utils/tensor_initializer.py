"""Initializers for embedding tables and dense weights.

Each initializer is a callable that fills a tensor in place (and returns it), so it can be passed to
TorchRec's `EmbeddingConfig.init_fn`, used for `nn.Linear` weights, or translated into dynamicemb's
initializer options through `kind` and `args`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def _fan_in(tensor: torch.Tensor) -> int:
    """The size of the last dimension: the input features of a `[out, in]` weight, the width of an embedding row."""
    if tensor.dim() == 0:
        raise ValueError("cannot initialize a 0-dimensional tensor")
    return max(int(tensor.shape[-1]), 1)


class Initializer(ABC):
    """Fills a tensor in place. `kind` and `args` describe it to embedding backends that initialize rows lazily."""

    kind: str

    @abstractmethod
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def args(self, dim: int) -> dict[str, float]:
        """The concrete parameters used for rows of width `dim` (bounds resolved against the fan-in)."""


@dataclass(frozen=True)
class UniformInitializer(Initializer):
    """U(low, high). Without bounds, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in the last dimension."""

    low: float | None = None
    high: float | None = None
    kind = "uniform"

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise ValueError("UniformInitializer takes both low and high, or neither")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"UniformInitializer needs low < high, got low={self.low}, high={self.high}")

    def args(self, dim: int) -> dict[str, float]:
        if self.low is None or self.high is None:
            bound = 1.0 / math.sqrt(max(dim, 1))
            return {"low": -bound, "high": bound}
        return {"low": self.low, "high": self.high}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        bounds = self.args(_fan_in(tensor))
        with torch.no_grad():
            return tensor.uniform_(bounds["low"], bounds["high"])


@dataclass(frozen=True)
class NormalInitializer(Initializer):
    """N(mean, std^2). Without `std`, std = 1/sqrt(fan_in)."""

    mean: float = 0.0
    std: float | None = None
    kind = "normal"

    def __post_init__(self) -> None:
        if self.std is not None and self.std <= 0:
            raise ValueError(f"NormalInitializer needs std > 0, got {self.std}")

    def args(self, dim: int) -> dict[str, float]:
        std = self.std if self.std is not None else 1.0 / math.sqrt(max(dim, 1))
        return {"mean": self.mean, "std": std}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        a = self.args(_fan_in(tensor))
        with torch.no_grad():
            return tensor.normal_(a["mean"], a["std"])


@dataclass(frozen=True)
class TruncatedNormalInitializer(Initializer):
    """N(mean, std^2) truncated to mean +- 2 std. Without `std`, std = 1/sqrt(fan_in)."""

    mean: float = 0.0
    std: float | None = None
    kind = "truncated_normal"

    def __post_init__(self) -> None:
        if self.std is not None and self.std <= 0:
            raise ValueError(f"TruncatedNormalInitializer needs std > 0, got {self.std}")

    def args(self, dim: int) -> dict[str, float]:
        std = self.std if self.std is not None else 1.0 / math.sqrt(max(dim, 1))
        return {"mean": self.mean, "std": std}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        a = self.args(_fan_in(tensor))
        lo, hi = a["mean"] - 2 * a["std"], a["mean"] + 2 * a["std"]
        with torch.no_grad():
            return torch.nn.init.trunc_normal_(tensor, a["mean"], a["std"], lo, hi)


@dataclass(frozen=True)
class XavierUniformInitializer(Initializer):
    """Glorot uniform for 2-D weights: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""

    gain: float = 1.0
    kind = "uniform"

    def args(self, dim: int) -> dict[str, float]:
        bound = self.gain * math.sqrt(6.0 / (2 * max(dim, 1)))
        return {"low": -bound, "high": bound}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() < 2:
            raise ValueError(f"XavierUniformInitializer needs a tensor of 2 or more dimensions, got {tensor.dim()}")
        with torch.no_grad():
            return torch.nn.init.xavier_uniform_(tensor, gain=self.gain)


@dataclass(frozen=True)
class ConstantInitializer(Initializer):
    """Every element equals `value`."""

    value: float = 0.0
    kind = "constant"

    def args(self, dim: int) -> dict[str, float]:
        return {"value": self.value}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tensor.fill_(self.value)
