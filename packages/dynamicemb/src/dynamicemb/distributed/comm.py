"""Collectives of the dynamic-table path, in plain ``torch.distributed`` (gloo and NCCL)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torchrec.distributed import comm_ops
from torchrec.distributed.types import Awaitable

__all__ = ["AllToAllAwaitable", "all_gather_counts", "all_to_all_with_grad", "comm_dtypes"]


def all_gather_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's ``counts [...]`` int64 -> ``[world_size, ...]`` on the host."""
    world_size = dist.get_world_size(group)
    gathered = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(gathered, counts, group=group)
    return torch.stack(gathered).cpu()


class AllToAllAwaitable(Awaitable[torch.Tensor]):
    """An all-to-all of a 1-D tensor started with ``async_op``; :meth:`wait` returns the output."""

    def __init__(
        self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
    ) -> None:
        super().__init__()
        self._output = tensor.new_empty(sum(output_splits))
        self._work = dist.all_to_all_single(
            self._output, tensor, output_splits, input_splits, group=group, async_op=True
        )

    def _wait_impl(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._output


def _exchange(
    tensor: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
    dtype: torch.dtype,
) -> torch.Tensor:
    send = tensor.to(dtype).contiguous()
    out = send.new_empty(sum(output_splits))
    dist.all_to_all_single(out, send, output_splits, input_splits, group=group)
    return out.to(tensor.dtype)


class _AllToAllWithGrad(torch.autograd.Function):
    """Forward: all-to-all of ``[sum(input_splits)]`` -> ``[sum(output_splits)]`` sent in
    ``forward_dtype``; backward: the reverse all-to-all of the gradient, sent in ``backward_dtype``
    and divided by the world size when TorchRec's gradient division is on (its default, see
    ``torchrec.distributed.comm_ops.set_gradient_division``), as TorchRec's embedding all-to-alls do."""

    @staticmethod
    def forward(
        ctx: Any,
        tensor: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup,
        forward_dtype: torch.dtype,
        backward_dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        ctx.backward_dtype = backward_dtype
        return _exchange(tensor, output_splits, input_splits, group, forward_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        output_splits, input_splits = ctx.splits
        grad_input = _exchange(grad, input_splits, output_splits, ctx.group, ctx.backward_dtype)
        if comm_ops.get_gradient_division():
            grad_input = grad_input / dist.get_world_size(ctx.group)
        return grad_input, None, None, None, None, None


def all_to_all_with_grad(
    tensor: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
    forward_dtype: torch.dtype | None = None,
    backward_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """All-to-all of a 1-D tensor that autograd differentiates (the gradient takes the reverse
    route and is divided by the world size under TorchRec's gradient division).
    ``forward_dtype`` / ``backward_dtype``: the dtype on the wire (default: the tensor's)."""
    return _AllToAllWithGrad.apply(
        tensor, output_splits, input_splits, group, forward_dtype or tensor.dtype, backward_dtype or tensor.dtype
    )


_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def comm_dtypes(
    qcomm_codecs_registry: dict[str, Any] | None, comm_op: str
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """Wire dtypes (forward, backward) of ``comm_op`` (a TorchRec ``CommOp`` name) from a TorchRec
    ``qcomm_codecs_registry``; ``(None, None)`` when it has no entry. Only casts are applied (no
    fbgemm quantization kernel runs): FP32, FP16 and BF16 precisions are supported."""
    if not qcomm_codecs_registry or comm_op not in qcomm_codecs_registry:
        return None, None
    codecs = qcomm_codecs_registry[comm_op]
    dtypes = (codecs.forward.quantized_dtype, codecs.backward.quantized_dtype)
    for dtype in dtypes:
        if dtype not in _WIRE_DTYPES:
            raise NotImplementedError(
                f"dynamic tables send {comm_op} as float32, float16 or bfloat16; the codec asks for {dtype}"
            )
    return dtypes
