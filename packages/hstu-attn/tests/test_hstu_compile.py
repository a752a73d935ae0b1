"""`torch.compile(fullgraph=True)` traces modules calling `hstu_attn_varlen_func`; the custom ops pass opcheck."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hstu_attn import KernelBackend, RelativeBias, hstu_attn_varlen_func
from hstu_attn.interface import _hstu_attn_backward, _hstu_attn_forward

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HEADS, DIM, MAX_LEN = 2, 4, 6


class TinyHSTULayer(nn.Module):
    """Projection -> jagged HSTU attention with targets, context, window and both bias kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(8, 3 * HEADS * DIM)
        self.position_weights = nn.Parameter(torch.randn(HEADS, 7))
        self.time_weights = nn.Parameter(torch.randn(1, 5))

    def forward(self, x: Tensor, seq_offsets: Tensor, timestamps: Tensor, num_targets: Tensor, rab: Tensor) -> Tensor:
        q, k, v = self.projection(x).view(-1, HEADS, 3 * DIM).split(DIM, dim=-1)
        bias = RelativeBias(self.position_weights, self.time_weights, timestamps, time_bucket_divisor=0.5)
        return hstu_attn_varlen_func(
            q, k, v, seq_offsets, MAX_LEN, num_targets=num_targets, contextual_seq_len=1, max_attn_len=2,
            rab=rab, relative_bias=bias, backend=KernelBackend.PYTORCH,
        )  # fmt: skip


class AttentionWithPositionBias(nn.Module):
    """Only the attention call, so that Inductor has little else to compile."""

    def __init__(self) -> None:
        super().__init__()
        self.position_weights = nn.Parameter(torch.randn(HEADS, 7))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor) -> Tensor:
        bias = RelativeBias(position_weights=self.position_weights)
        return hstu_attn_varlen_func(q, k, v, seq_offsets, MAX_LEN, relative_bias=bias, backend="pytorch")


def _forward_backward(module: nn.Module, args: tuple[Tensor, ...]) -> list[Tensor]:
    leaves = [*module.parameters(), *(a for a in args if a.requires_grad)]
    out = module(*args)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]


def test_aot_compiled_hstu_layer_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    layer = TinyHSTULayer()
    args = (
        torch.randn(9, 8),
        torch.tensor([0, 5, 5, 9]),
        torch.randint(0, 100, (9,)),
        torch.tensor([1, 0, 2]),
        torch.randn(3, 1, MAX_LEN, MAX_LEN, requires_grad=True),
    )
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, expected in zip(_forward_backward(compiled, args), _forward_backward(layer, args)):
        torch.testing.assert_close(got, expected)


def test_inductor_compiled_attention_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(1)
    module = AttentionWithPositionBias()
    q, k, v = (torch.randn(9, HEADS, DIM, requires_grad=True) for _ in range(3))
    args = (q, k, v, torch.tensor([0, 5, 5, 9]))
    compiled = torch.compile(module, fullgraph=True)
    for got, expected in zip(_forward_backward(compiled, args), _forward_backward(module, args)):
        torch.testing.assert_close(got, expected)


def _op_args(with_bias: bool) -> tuple:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, HEADS, DIM, generator=generator, requires_grad=True) for _ in range(3))
    offsets = torch.tensor([0, 3, 3, 7])
    tables: tuple = (None, None, None, None)
    if with_bias:
        tables = (
            torch.randn(3, 1, 4, 4, generator=generator, requires_grad=True),
            torch.randn(1, 5, generator=generator, requires_grad=True),
            torch.randn(HEADS, 3, generator=generator, requires_grad=True),
            torch.randint(0, 50, (7,), generator=generator),
        )
    scalars = (4, 0.5, 4, True, 1, 2, 0.4, "pytorch", False, False)
    return (q, k, v, offsets, torch.tensor([1, 0, 4]), *tables, *scalars)


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_op_passes_opcheck(with_bias: bool) -> None:
    torch.library.opcheck(_hstu_attn_forward, _op_args(with_bias))


def test_backward_op_passes_opcheck() -> None:
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in _op_args(with_bias=True))
    grad_out = torch.randn(7, HEADS, DIM)
    torch.library.opcheck(_hstu_attn_backward, (grad_out, *args, True))
    torch.library.opcheck(_hstu_attn_backward, (grad_out, *args, False))
