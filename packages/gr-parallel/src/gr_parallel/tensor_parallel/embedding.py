"""Embedding lookup shared by a tensor-parallel group that trains on the same samples.

Every rank of a tensor-parallel group gets the same batch. Looking the whole batch up on every rank would do the
work `size` times and send `size` copies of each embedding gradient to the tables. Instead each rank looks up a
contiguous `1/size` of the samples and the embeddings are all-gathered inside the group; in backward each rank
hands its tables only the gradient rows of its own samples (the gradient of the gathered embeddings is the same
on every rank, since everything downstream is either replicated or tensor-parallel with reduced input
gradients), so each sample's gradient reaches the tables exactly once.

This is for tables sharded over the world (TorchRec or dynamicemb sharded modules). Their all-to-alls divide
the gradient by the world size when TorchRec's gradient division is on (its default), which is `dp * tp` ranks
for `dp` distinct batches; the gradient handed to the lookup is therefore multiplied by the tensor-parallel
size, so the tables get the gradient of the loss averaged over the data-parallel ranks, as with one
tensor-parallel rank. Replicated (data-parallel) tables do not belong here: look the whole batch up on every
rank; their gradients are then complete on every tensor-parallel rank, and DDP averages them over the
data-parallel group.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gr_parallel.state import get_tensor_model_parallel_group, model_parallel_is_initialized
from gr_parallel.tensor_parallel.mappings import gather_rows_from_tensor_parallel_region

__all__ = ["lookup_split_over_tensor_parallel", "sample_split"]

Lookup = Callable[[KeyedJaggedTensor], Mapping[str, JaggedTensor]]


def sample_split(batch_size: int, size: int) -> list[int]:
    """Sample boundaries `[0, ..., batch_size]` of `size` contiguous parts, the first `batch_size % size` one
    sample larger."""
    base, extra = divmod(batch_size, size)
    bounds = [0]
    for part in range(size):
        bounds.append(bounds[-1] + base + (part < extra))
    return bounds


def _select_samples(features: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """The samples `[start, stop)` of every key of `features`."""
    keys, stride = features.keys(), features.stride()
    lengths = features.lengths().view(len(keys), stride)
    key_starts = torch.arange(len(keys), device=lengths.device) * stride
    offsets = features.offsets()
    value_ranges = torch.stack([offsets[key_starts + start], offsets[key_starts + stop]], dim=1).tolist()

    def pick(values: Tensor) -> Tensor:
        return torch.cat([values[lo:hi] for lo, hi in value_ranges])

    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=pick(features.values()),
        weights=pick(weights) if weights is not None else None,
        lengths=lengths[:, start:stop].reshape(-1),
        stride=stop - start,
    )


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def lookup_split_over_tensor_parallel(
    lookup: Lookup, features: KeyedJaggedTensor, group: dist.ProcessGroup | None = None
) -> dict[str, JaggedTensor]:
    """`lookup(features)` computed once across the tensor-parallel group.

    Args:
        lookup: KJT of a batch -> `{feature: JaggedTensor(values [N_f, dim_f], lengths [B])}` with the input's
            lengths (e.g. a TorchRec `EmbeddingCollection`, sharded or not, or gr-models' embedding module).
            It is called on every rank, each with its part of the samples, so collective lookups (a
            `DistributedModelParallel` module) stay in step.
        features: the batch, equal on every rank of the group; `stride()` B samples.
        group: default the tensor-parallel group; without model-parallel state or with one rank, this is
            `dict(lookup(features))`.

    Returns:
        `{feature: JaggedTensor(values [N_f, dim_f], lengths [B])}` for the whole batch on every rank, equal to
        looking the whole batch up; gradients reach `lookup` only for this rank's samples, multiplied by the
        group size when TorchRec's gradient division is on (see the module docstring).
    """
    if group is None:
        if not model_parallel_is_initialized():
            return dict(lookup(features))
        group = get_tensor_model_parallel_group()
    size = group.size()
    if size == 1:
        return dict(lookup(features))
    if features.variable_stride_per_key():
        raise NotImplementedError("lookup_split_over_tensor_parallel needs one batch size for every key")
    bounds = sample_split(features.stride(), size)
    rank = group.rank()
    local = lookup(_select_samples(features, bounds[rank], bounds[rank + 1]))
    if isinstance(local, Awaitable):  # a sharded TorchRec module's lazy result
        local = local.wait()
    scale = float(size) if get_gradient_division() else 1.0
    return _gather_features(local, features, bounds, group, scale)


def _gather_features(
    local: Mapping[str, JaggedTensor],
    features: KeyedJaggedTensor,
    bounds: list[int],
    group: dist.ProcessGroup,
    grad_scale: float,
) -> dict[str, JaggedTensor]:
    names = list(local)
    lengths = {name: features[name].lengths() for name in names}
    # rows[f][r]: rows of feature f in rank r's samples, from the full lengths every rank holds (one host sync).
    per_part = torch.stack(
        [torch.stack([lengths[n][lo:hi].sum() for lo, hi in itertools.pairwise(bounds)]) for n in names]
    ).tolist()
    rows = dict(zip(names, per_part))
    gathered: dict[str, JaggedTensor] = {}
    for dtype in dict.fromkeys(local[n].values().dtype for n in names):
        group_names = [n for n in names if local[n].values().dtype == dtype]
        widths = {n: local[n].values().shape[1] for n in group_names}
        flat = _ScaleGradient.apply(torch.cat([local[n].values().reshape(-1) for n in group_names]), grad_scale)
        counts = [sum(rows[n][r] * widths[n] for n in group_names) for r in range(group.size())]
        full = gather_rows_from_tensor_parallel_region(flat, counts, group)
        blocks = full.split([rows[n][r] * widths[n] for r in range(group.size()) for n in group_names])
        for i, name in enumerate(group_names):
            parts = blocks[i :: len(group_names)]
            values = torch.cat(parts).view(-1, widths[name])
            gathered[name] = JaggedTensor(values=values, lengths=lengths[name])
    return {name: gathered[name] for name in names}
