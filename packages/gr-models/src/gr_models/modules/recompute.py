"""Drop cheap activations from autograd's saved tensors and recompute them in backward.

Autograd keeps every tensor an op needs for its backward. For an output of a cheap op (a LayerNorm) consumed by
an expensive one (a matmul, a product), `recompute_in_backward` makes autograd keep a recipe instead of the
tensor: in backward the cheap op runs again on its (already kept) input. The forward result and the gradients
are unchanged; peak activation memory drops by one tensor per use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class _Recipe:
    __slots__ = ("dtype", "recompute")

    def __init__(self, recompute: Callable[[], Tensor], dtype: torch.dtype) -> None:
        self.recompute = recompute
        self.dtype = dtype


@contextmanager
def recompute_in_backward(activation: Tensor, recompute: Callable[[], Tensor]) -> Iterator[None]:
    """Inside the block, ops that save `activation` (or a same-storage view/cast of it) for backward save
    `recompute` instead, which must return a tensor equal to `activation`.

    Matching is by storage and shape, so a dtype cast made inside the block (autocast) is matched by dtype as well.
    """
    storage = activation.untyped_storage().data_ptr()

    def pack(saved: Tensor) -> Tensor | _Recipe:
        if saved.shape == activation.shape and saved.untyped_storage().data_ptr() == storage:
            return _Recipe(recompute, saved.dtype)
        return saved

    def unpack(saved: Tensor | _Recipe) -> Tensor:
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.recompute().to(saved.dtype)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
