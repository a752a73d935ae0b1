"""`hstu_attn_varlen_func(check_finite=True)`: the error names the tensor and the first token holding inf or nan."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hstu_attn import RelativeBias, hstu_attn_varlen_func

LENGTHS = [3, 0, 4, 1]  # tokens 0-2: sequence 0; 3-6: sequence 2; 7: sequence 3
HEADS, DIM = 2, 4


def _inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, HEADS, DIM, generator=generator, dtype=torch.float32) for _ in range(3))
    return dict(q=q, k=k, v=v, seq_offsets=torch.tensor([0, 3, 3, 7, 8]), max_seq_len=4, check_finite=True)


@pytest.mark.parametrize(
    ("name", "token", "head", "value", "expected"),
    [
        ("q", 5, 1, float("nan"), "q holds nan at token 5 (sequence 2, position 2, head 1)"),
        ("k", 0, 0, float("inf"), "k holds inf at token 0 (sequence 0, position 0, head 0)"),
        ("v", 7, 1, float("-inf"), "v holds -inf at token 7 (sequence 3, position 0, head 1)"),
        ("v", 3, 0, float("nan"), "v holds nan at token 3 (sequence 2, position 0, head 0)"),
    ],
)
def test_non_finite_input_is_named_with_its_first_token(
    name: str, token: int, head: int, value: float, expected: str
) -> None:
    inputs = _inputs()
    inputs[name][token, head, 2] = value
    inputs[name][token + 1 :, :, :] = value  # later bad tokens: the first one is named
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        hstu_attn_varlen_func(**inputs)


def test_off_by_default_and_finite_inputs_pass() -> None:
    inputs = _inputs()
    assert torch.isfinite(hstu_attn_varlen_func(**inputs)).all()
    inputs["v"][6, 0, 0] = float("nan")
    inputs["check_finite"] = False
    out = hstu_attn_varlen_func(**inputs)
    assert torch.isnan(out[6]).any() and torch.isfinite(out[:6]).all()  # causal: earlier rows never see token 6


def test_rab_is_checked_only_at_attended_pairs() -> None:
    inputs = _inputs()
    rab = torch.zeros(len(LENGTHS), 1, 4, 4)
    rab[2, 0, 0, 3] = float("nan")  # row 0 never attends position 3 (causal); padding of sequence 3 too
    rab[3, 0, 1:, :] = float("inf")
    out = hstu_attn_varlen_func(**inputs, rab=rab)
    assert torch.isfinite(out).all()
    rab[2, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rab holds nan at sequence 2, head 0, query position 3, key position 1"):
        hstu_attn_varlen_func(**inputs, rab=rab)


def test_bias_table_is_named() -> None:
    inputs = _inputs()
    table = torch.zeros(HEADS, 5)
    table[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"relative_bias.position_weights holds inf at entry \[1, 4\]"):
        hstu_attn_varlen_func(**inputs, relative_bias=RelativeBias(position_weights=table))


def test_backward_names_grad_out() -> None:
    inputs = _inputs()
    leaves: list[Tensor] = [inputs[name].requires_grad_() for name in ("q", "k", "v")]
    out = hstu_attn_varlen_func(**inputs)
    grad_out = torch.ones_like(out)
    grad_out[4, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"grad_out holds nan at token 4 \(sequence 2, position 1, head 1\)"):
        torch.autograd.grad(out, leaves, grad_out)


def test_empty_batch_passes() -> None:
    empty = torch.empty(0, HEADS, DIM)
    out = hstu_attn_varlen_func(empty, empty, empty, torch.zeros(1, dtype=torch.int64), 0, check_finite=True)
    assert out.shape == (0, HEADS, DIM)
