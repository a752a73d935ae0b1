"""The PyTorch reference against dead-simple per-element oracles and hand-computed masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from hstu_attn import RelativeBias, hstu_attn_reference
from hstu_attn.reference import hstu_attn_valid_mask
from hstu_attn.relative_bias import bucketize_time_delta


def attends(i: int, j: int, n: int, *, causal: bool, targets: int, contextual: int, window: int) -> bool:
    """Whether query i attends key j in a sequence of length n, written as plain if-statements."""
    history = n - targets
    if j < history and (i < contextual or j < contextual):
        return True
    if i == j:
        return True
    if j >= history:
        return False
    if i < history:
        if causal and j > i:
            return False
        distance = abs(i - j)
    else:
        distance = history - j
    return window == 0 or distance <= window


def relative_bias_value(
    i: int,
    j: int,
    head: int,
    times: list[float] | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    divisor: float,
) -> float:
    """Position + time bias of (i, j) in one sequence, from the scalar formulas."""
    total = 0.0
    if position_weights is not None:
        row = position_weights[head if position_weights.shape[0] > 1 else 0]
        reach = (position_weights.shape[1] - 1) // 2
        total += float(row[max(-reach, min(reach, j - i)) + reach])
    if time_weights is not None:
        assert times is not None
        row = time_weights[head if time_weights.shape[0] > 1 else 0]
        magnitude = max(abs(times[j] - times[i]), 1.0)
        bucket = min(max(math.floor(math.log(magnitude) / divisor), 0), time_weights.shape[1] - 1)
        total += float(row[bucket])
    return total


def loop_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    *,
    alpha: float,
    scaling: float,
    causal: bool = True,
    num_targets: Tensor | None = None,
    contextual: int = 0,
    window: int = 0,
    rab: Tensor | None = None,
    position_weights: Tensor | None = None,
    time_weights: Tensor | None = None,
    timestamps: Tensor | None = None,
    divisor: float = 0.301,
) -> Tensor:
    """HSTU attention one output element at a time, in float64."""
    num_heads, head_dim_v = q.shape[1], v.shape[2]
    out = torch.zeros(q.shape[0], num_heads, head_dim_v, dtype=torch.float64)
    offsets = [int(x) for x in seq_offsets]
    for b in range(len(offsets) - 1):
        start, n = offsets[b], offsets[b + 1] - offsets[b]
        targets = 0 if num_targets is None else int(num_targets[b])
        times = None if timestamps is None else [float(timestamps[start + p]) for p in range(n)]
        for h in range(num_heads):
            for i in range(n):
                for j in range(n):
                    if not attends(i, j, n, causal=causal, targets=targets, contextual=contextual, window=window):
                        continue
                    s = alpha * float(torch.dot(q[start + i, h].double(), k[start + j, h].double()))
                    if rab is not None:
                        s += float(rab[b, h if rab.shape[1] > 1 else 0, i, j])
                    s += relative_bias_value(i, j, h, times, position_weights, time_weights, divisor)
                    weight = s / (1.0 + math.exp(-s)) / scaling
                    out[start + i, h] += weight * v[start + j, h].double()
    return out


def _mask_from_rows(rows: str) -> Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows.split()])


HAND_MASKS = [
    ({}, "100000 110000 111000 111100 111110 111111"),
    ({"causal": False}, "111111 111111 111111 111111 111111 111111"),
    ({"num_targets": 2}, "100000 110000 111000 111100 111110 111101"),
    ({"num_targets": 2, "causal": False}, "111100 111100 111100 111100 111110 111101"),
    ({"num_targets": 6}, "100000 010000 001000 000100 000010 000001"),
    ({"num_targets": 0}, "100000 110000 111000 111100 111110 111111"),
    ({"contextual_seq_len": 1}, "111111 110000 111000 111100 111110 111111"),
    ({"contextual_seq_len": 2, "num_targets": 2}, "111100 111100 111000 111100 111110 111101"),
    ({"max_attn_len": 2}, "100000 110000 111000 011100 001110 000111"),
    ({"max_attn_len": 1, "causal": False}, "110000 111000 011100 001110 000111 000011"),
    ({"max_attn_len": 1, "num_targets": 2}, "100000 110000 011000 001100 000110 000101"),
    (
        {"num_targets": 2, "contextual_seq_len": 1, "max_attn_len": 2},
        "111100 110000 111000 111100 101110 101101",
    ),
    (
        {"num_targets": 2, "contextual_seq_len": 1, "max_attn_len": 1, "causal": False},
        "111100 111000 111100 101100 100110 100101",
    ),
    ({"num_targets": 2, "contextual_seq_len": 5}, "111100 111100 111100 111100 111110 111101"),
]


@pytest.mark.parametrize(("options", "rows"), HAND_MASKS)
def test_valid_mask_matches_hand_computed_n6(options: dict, rows: str) -> None:
    assert torch.equal(hstu_attn_valid_mask(6, **options), _mask_from_rows(rows))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("contextual", [0, 1, 3])
@pytest.mark.parametrize("window", [0, 1, 2])
def test_valid_mask_matches_plain_rules(causal: bool, contextual: int, window: int) -> None:
    for n in range(0, 7):
        for targets in range(0, n + 1):
            expected = torch.tensor(
                [
                    [
                        attends(i, j, n, causal=causal, targets=targets, contextual=contextual, window=window)
                        for j in range(n)
                    ]
                    for i in range(n)
                ],
                dtype=torch.bool,
            ).view(n, n)
            got = hstu_attn_valid_mask(
                n, causal=causal, num_targets=targets, contextual_seq_len=contextual, max_attn_len=window
            )
            assert torch.equal(got, expected), (n, targets)


OPTION_SETS = [
    {},
    {"causal": False},
    {"targets": True},
    {"targets": True, "causal": False},
    {"contextual": 2},
    {"window": 2},
    {"window": 1, "causal": False},
    {"targets": True, "contextual": 1, "window": 2},
    {"targets": True, "contextual": 2, "window": 1, "causal": False},
]

# Lengths with an empty sequence in the middle, length 1, and per-sequence targets of 0 and the full length.
LENGTHS = [5, 0, 1, 4, 3]
TARGETS = [2, 0, 1, 4, 0]


def _offsets(lengths: list[int], dtype: torch.dtype) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_reference_matches_loop_oracle(options: dict, offsets_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    heads, dim_qk, dim_v, max_len = 2, 3, 4, 6
    offsets = _offsets(LENGTHS, offsets_dtype)
    total = int(offsets[-1])

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = rand(total, heads, dim_qk), rand(total, heads, dim_qk), rand(total, heads, dim_v)
    rab = rand(len(LENGTHS), 1, max_len, max_len)
    bias = RelativeBias(
        position_weights=rand(heads, 5),
        time_weights=rand(1, 6),
        timestamps=torch.randint(0, 400, (total,), generator=generator),
        time_bucket_divisor=0.9,
    )
    num_targets = torch.tensor(TARGETS, dtype=offsets_dtype) if options.get("targets") else None
    causal = options.get("causal", True)
    contextual, window = options.get("contextual", 0), options.get("window", 0)

    got = hstu_attn_reference(
        q, k, v, offsets, max_len, alpha=0.7, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual, max_attn_len=window, scaling_seqlen=5, rab=rab, relative_bias=bias,
    )  # fmt: skip
    expected = loop_hstu_attention(
        q, k, v, offsets, alpha=0.7, scaling=5.0, causal=causal, num_targets=num_targets,
        contextual=contextual, window=window, rab=rab, position_weights=bias.position_weights,
        time_weights=bias.time_weights, timestamps=bias.timestamps, divisor=0.9,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_defaults_alpha_and_scaling_and_no_bias() -> None:
    generator = torch.Generator().manual_seed(1)
    offsets = _offsets([3, 1, 4], torch.int64)
    q, k, v = (torch.randn(8, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    got = hstu_attn_reference(q, k, v, offsets, 7)
    expected = loop_hstu_attention(q, k, v, offsets, alpha=0.5, scaling=7.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_empty_batch_and_all_empty_sequences() -> None:
    q = torch.randn(0, 2, 8, requires_grad=True)
    v = torch.randn(0, 2, 3)
    out = hstu_attn_reference(q, q, v, torch.zeros(1, dtype=torch.int64), 0)
    assert out.shape == (0, 2, 3)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    out = hstu_attn_reference(q, q, v, torch.zeros(4, dtype=torch.int32), 5)
    assert out.shape == (0, 2, 3)


def test_reference_length_one_sequence_is_silu_of_self_score() -> None:
    q = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    k = torch.tensor([[[0.5, -1.0]]], dtype=torch.float64)
    v = torch.tensor([[[3.0, -2.0, 1.0]]], dtype=torch.float64)
    out = hstu_attn_reference(q, k, v, torch.tensor([0, 1]), 4, alpha=2.0)
    s = 2.0 * (0.5 - 2.0)
    expected = (s / (1 + math.exp(-s)) / 4) * v
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)


def test_reference_keeps_low_precision_dtype_and_tracks_fp64() -> None:
    generator = torch.Generator().manual_seed(2)
    offsets = _offsets([7, 2, 5], torch.int64)
    q, k, v = (torch.randn(14, 2, 16, generator=generator) for _ in range(3))
    exact = hstu_attn_reference(q.double(), k.double(), v.double(), offsets, 8)
    low = hstu_attn_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), offsets, 8)
    assert low.dtype == torch.bfloat16
    assert (low.double() - exact).abs().max() <= 0.05 * exact.abs().max()


def test_reference_ignores_non_finite_rab_outside_the_mask() -> None:
    generator = torch.Generator().manual_seed(3)
    offsets = _offsets([3, 2], torch.int64)
    q, k, v = (torch.randn(5, 1, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    rab = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64)
    poisoned = rab.clone()
    mask = torch.stack(
        [hstu_attn_valid_mask(4) & (torch.arange(4) < n).view(-1, 1) & (torch.arange(4) < n) for n in (3, 2)]
    )
    poisoned[~mask.unsqueeze(1)] = float("inf")
    poisoned.requires_grad_(True)
    out = hstu_attn_reference(q, k, v, offsets, 4, rab=poisoned)
    torch.testing.assert_close(out, hstu_attn_reference(q, k, v, offsets, 4, rab=rab))
    out.sum().backward()
    assert poisoned.grad is not None and torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[~mask.unsqueeze(1)] == 0).all()


def test_bucketize_time_delta_hand_values() -> None:
    delta = torch.tensor([0, 1, -1, 2, -2, 3, 20, -20, 10**9])
    # log|d| / 0.301: 0, 0, 0, 2.30, 2.30, 3.65, 9.95, 9.95, 68.8 -> clamped to 9 buckets (0..8)
    expected = torch.tensor([0, 0, 0, 2, 2, 3, 8, 8, 8])
    assert torch.equal(bucketize_time_delta(delta, 0.301, 9), expected)
    assert bucketize_time_delta(delta, 0.301, 9).dtype == torch.int64
    assert torch.equal(bucketize_time_delta(torch.tensor([0.5, -2.5, 7.4]), 1.0, 4), torch.tensor([0, 0, 2]))


@pytest.mark.parametrize(("position_rows", "time_rows"), [(3, 1), (1, 3), (3, 3), (1, 0), (0, 3)])
def test_relative_bias_materialize_matches_scalar_formula(position_rows: int, time_rows: int) -> None:
    generator = torch.Generator().manual_seed(4)
    heads, max_len = 3, 6
    lengths = [6, 0, 2, 5]
    offsets = _offsets(lengths, torch.int32)
    bias = RelativeBias(
        position_weights=torch.randn(position_rows, 7, generator=generator) if position_rows else None,
        time_weights=torch.randn(time_rows, 5, generator=generator) if time_rows else None,
        timestamps=torch.randint(0, 10**6, (int(offsets[-1]),), generator=generator) if time_rows else None,
        time_bucket_divisor=2.5,
    )
    dense = bias.materialize(offsets, max_len, heads)
    assert dense.shape == (4, max(position_rows, time_rows), max_len, max_len)
    for b, n in enumerate(lengths):
        start = int(offsets[b])
        times = None if bias.timestamps is None else [float(t) for t in bias.timestamps[start : start + n]]
        for h in range(dense.shape[1]):
            for i in range(n):
                for j in range(n):
                    expected = relative_bias_value(
                        i, j, h, times, bias.position_weights, bias.time_weights, bias.time_bucket_divisor
                    )
                    assert float(dense[b, h, i, j]) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs position_weights, time_weights or both"),
        ({"position_weights": torch.zeros(2, 4)}, "odd width"),
        ({"position_weights": torch.zeros(5)}, r"\[Hb, 2\*M - 1\]"),
        ({"position_weights": torch.zeros(1, 3, dtype=torch.int64)}, "floating point"),
        ({"time_weights": torch.zeros(1, 4)}, "needs RelativeBias.timestamps"),
        ({"time_weights": torch.zeros(1, 0), "timestamps": torch.zeros(3)}, "NB >= 1"),
        ({"time_weights": torch.zeros(1, 4), "timestamps": torch.zeros(3, 1)}, "timestamps must have shape"),
        ({"time_weights": torch.zeros(1, 4), "timestamps": torch.zeros(3, dtype=torch.bool)}, "integer or floating"),
        ({"position_weights": torch.zeros(1, 3), "time_bucket_divisor": 0.0}, "time_bucket_divisor must be > 0"),
    ],
)
def test_relative_bias_rejects_bad_tables(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RelativeBias(**kwargs)


def test_relative_bias_rejects_wrong_head_count() -> None:
    bias = RelativeBias(position_weights=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"position_weights has 2 rows; expected 1 \(shared\) or 4"):
        bias.materialize(torch.tensor([0, 3]), 3, 4)
