"""Fill embeddings of keys seen for the first time, from :class:`DynamicEmbInitializerArgs`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynamicemb.types import DynamicEmbInitializerMode

__all__ = ["DynamicEmbInitializerArgs", "EmbeddingInitializer"]


@dataclass
class DynamicEmbInitializerArgs:
    """Parameters of a :class:`DynamicEmbInitializerMode`.

    ``lower``/``upper`` left ``None`` become ``-1/sqrt(num_embeddings)`` / ``+1/sqrt(num_embeddings)``
    (``num_embeddings`` of the table's TorchRec config) for UNIFORM and TRUNCATED_NORMAL.
    """

    mode: DynamicEmbInitializerMode = DynamicEmbInitializerMode.UNIFORM
    mean: float = 0.0
    std_dev: float = 1.0
    lower: float | None = None
    upper: float | None = None
    value: float = 0.0

    def __post_init__(self) -> None:
        self.mode = DynamicEmbInitializerMode(self.mode)
        if self.std_dev < 0:
            raise ValueError(f"DynamicEmbInitializerArgs: std_dev must be >= 0, got {self.std_dev}")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"DynamicEmbInitializerArgs: lower {self.lower} > upper {self.upper}")


class EmbeddingInitializer:
    """Draws ``[n, dim]`` embeddings on ``device`` with the global torch RNG (so ``torch.manual_seed``
    makes them reproducible)."""

    def __init__(
        self,
        args: DynamicEmbInitializerArgs,
        *,
        dim: int,
        num_embeddings: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.args = args
        self.dim = dim
        self.dtype = dtype
        self.device = device
        bound = 1.0 / math.sqrt(max(num_embeddings, 1))
        self.lower = args.lower if args.lower is not None else -bound
        self.upper = args.upper if args.upper is not None else bound

    def __call__(self, n: int) -> torch.Tensor:
        """``[n, dim]`` fresh embeddings."""
        args = self.args
        mode = args.mode
        if mode is DynamicEmbInitializerMode.CONSTANT:
            return torch.full((n, self.dim), args.value, dtype=self.dtype, device=self.device)
        out = torch.empty((n, self.dim), dtype=torch.float32, device=self.device)
        if mode is DynamicEmbInitializerMode.UNIFORM:
            out.uniform_(self.lower, self.upper)
        elif mode is DynamicEmbInitializerMode.NORMAL:
            out.normal_(args.mean, args.std_dev)
        elif mode is DynamicEmbInitializerMode.TRUNCATED_NORMAL:
            torch.nn.init.trunc_normal_(out, args.mean, args.std_dev, self.lower, self.upper)
        else:  # an enum member added without an implementation here
            raise NotImplementedError(f"initializer mode {mode}")
        return out.to(self.dtype)
