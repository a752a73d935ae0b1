"""Fill embeddings of keys seen for the first time, from :class:`DynamicEmbInitializerArgs`."""

from __future__ import annotations

import math

import torch

from dynamicemb.options import DynamicEmbInitializerArgs
from dynamicemb.types import DynamicEmbInitializerMode

__all__ = ["EmbeddingInitializer"]


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
