"""A non-finite value at a token that a row may not attend never reaches that row, forward or backward.

For every mask option, fp32 and bf16, and both backends (PYTORCH: the reference forward and its explicit backward;
TRITON: on CPU under `TRITON_INTERPRET=1` at tiny sizes, 16x16 tiles): one entry of q, k, v or grad_out is set to
nan, inf or -inf in every non-empty sequence (head 0 only). From the valid mask follows which (token, head) pairs
of the output and of dq, dk, dv may depend on it; every other pair must be finite and equal to the run without the
poison, and every pair that does depend on it must be non-finite (a NaN is contained, not hidden). Output rows that
see the poison get a zero output gradient, as a loss that skips them would give.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from hstu_attn import KernelBackend, hstu_attn_varlen_func
from hstu_attn.reference import hstu_attn_valid_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = (5, 37, 0, 1, 20, 9)
HEADS, DIM = 2, 32
POISONED = ("q", "k", "v", "grad_out")
VALUES = (float("nan"), float("inf"), float("-inf"))

MASK_CASES = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "targets": dict(targets=(2, 5, 0, 1, 20, 3)),
    "targets_noncausal": dict(causal=False, targets=(2, 3, 0, 0, 7, 9)),
    "contextual": dict(contextual=3),
    "contextual_targets": dict(contextual=4, targets=(1, 30, 0, 1, 2, 2)),
    "window": dict(window=4),
    "window_noncausal": dict(causal=False, window=5),
    "everything_causal": dict(contextual=2, targets=(2, 4, 0, 1, 3, 2), window=6),
    "everything_noncausal": dict(causal=False, contextual=2, targets=(2, 4, 0, 1, 3, 2), window=6),
}


def _backends() -> list:
    no_triton = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
    skip = pytest.mark.skipif(no_triton, reason="Triton on CPU needs TRITON_INTERPRET=1")
    triton = pytest.param(KernelBackend.TRITON, marks=skip)
    return [KernelBackend.PYTORCH, triton]


def _offsets(lengths: tuple[int, ...]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)


def _valid(n: int, case: dict, b: int) -> Tensor:
    targets = case.get("targets")
    return hstu_attn_valid_mask(
        n,
        causal=case.get("causal", True),
        num_targets=None if targets is None else targets[b],
        contextual_seq_len=case.get("contextual", 0),
        max_attn_len=case.get("window", 0),
    )


def _reached(name: str, valid: Tensor, p: int) -> dict[str, Tensor]:
    """Which positions of one sequence, per result (out, dq, dk, dv), may depend on the poison at position p."""
    n = valid.shape[0]
    attend_p, seen_by_p, only_p, nothing = valid[:, p], valid[p, :], torch.arange(n) == p, torch.zeros(n, dtype=bool)
    if name in ("k", "v"):
        return {"out": attend_p, "dq": attend_p, "dk": only_p, "dv": only_p if name == "k" else nothing}
    out = only_p if name == "q" else nothing
    return {"out": out, "dq": only_p, "dk": seen_by_p, "dv": seen_by_p}


def _plan(case_index: int, case: dict) -> tuple[list[tuple[str, int, float]], dict[str, Tensor]]:
    """One poison per non-empty sequence (tensor, token, value), and the [L, H] map of reached pairs per result."""
    total = sum(LENGTHS)
    reached = {key: torch.zeros(total, HEADS, dtype=torch.bool) for key in ("out", "dq", "dk", "dv")}
    poisons, start = [], 0
    for b, n in enumerate(LENGTHS):
        if n:
            name = POISONED[(case_index + b) % len(POISONED)]
            u = n - (case.get("targets") or (0,) * len(LENGTHS))[b]
            p = (n // 2, max(u - 1, 0), min(u, n - 1), 0)[(case_index + b) % 4]
            poisons.append((name, start + p, VALUES[(case_index + b) % len(VALUES)]))
            for key, rows in _reached(name, _valid(n, case, b), p).items():
                reached[key][start : start + n, 0] |= rows
        start += n
    return poisons, reached


def _run(tensors: dict[str, Tensor], case: dict, backend: KernelBackend, deterministic: bool) -> dict[str, Tensor]:
    leaves = {name: tensors[name].clone().requires_grad_() for name in ("q", "k", "v")}
    targets = case.get("targets")
    out = hstu_attn_varlen_func(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        _offsets(LENGTHS),
        max(LENGTHS),
        causal=case.get("causal", True),
        num_targets=None if targets is None else torch.tensor(targets, device=DEVICE),
        contextual_seq_len=case.get("contextual", 0),
        max_attn_len=case.get("window", 0),
        backend=backend,
        deterministic=deterministic,
    )
    out.backward(tensors["grad_out"])
    results = {"out": out, **{f"d{name}": leaf.grad for name, leaf in leaves.items()}}
    return {key: value.detach().float().cpu() for key, value in results.items()}


def _check_contained(case_index: int, case: dict, dtype: torch.dtype, backend: KernelBackend, det: bool) -> None:
    gen = torch.Generator().manual_seed(case_index)
    total = sum(LENGTHS)
    clean = {name: torch.randn(total, HEADS, DIM, generator=gen).to(DEVICE, dtype) for name in POISONED}
    poisons, reached = _plan(case_index, case)
    clean["grad_out"][reached["out"].to(DEVICE)] = 0  # rows that see a poisoned value are left out of the loss
    poisoned = {name: t.clone() for name, t in clean.items()}
    for name, token, value in poisons:
        poisoned[name][token, 0, 5] = value
    want, got = _run(clean, case, backend, det), _run(poisoned, case, backend, det)
    for key in ("out", "dq", "dk", "dv"):
        kept = ~reached[key]
        assert torch.isfinite(got[key][kept]).all(), f"{key}: a non-finite value leaked to a pair that cannot see it"
        torch.testing.assert_close(got[key][kept], want[key][kept], msg=lambda m, key=key: f"{key}: {m}")
        finite_rows = torch.isfinite(got[key]).all(dim=-1)
        assert not finite_rows[reached[key]].any(), f"{key}: a pair that attends a non-finite value came out finite"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", MASK_CASES.keys())
def test_masked_non_finite_values_stay_out(mask: str, dtype: torch.dtype, backend: KernelBackend) -> None:
    case_index = list(MASK_CASES).index(mask)
    _check_contained(case_index, MASK_CASES[mask], dtype, backend, det=False)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mask", ["targets", "everything_noncausal"])
def test_masked_non_finite_values_stay_out_of_the_separate_dq_kernel(mask: str, backend: KernelBackend) -> None:
    case_index = list(MASK_CASES).index(mask)
    _check_contained(case_index + 1, MASK_CASES[mask], torch.bfloat16, backend, det=True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", [dict(contextual=2, targets=(2, 4, 0, 1, 3, 2), window=6), dict(causal=False)])
def test_non_finite_rab_at_unattended_pairs_changes_nothing(case: dict, backend: KernelBackend) -> None:
    gen = torch.Generator().manual_seed(3)
    total, max_len = sum(LENGTHS), max(LENGTHS)
    q, k, v, grad_out = (torch.randn(total, HEADS, DIM, generator=gen).to(DEVICE) for _ in range(4))
    valid = torch.zeros(len(LENGTHS), 1, max_len, max_len, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        valid[b, 0, :n, :n] = _valid(n, case, b)
    rab = torch.randn(len(LENGTHS), 1, max_len, max_len, generator=gen)
    targets = case.get("targets")
    kwargs = dict(
        causal=case.get("causal", True),
        num_targets=None if targets is None else torch.tensor(targets, device=DEVICE),
        contextual_seq_len=case.get("contextual", 0),
        max_attn_len=case.get("window", 0),
        backend=backend,
    )
    results = []
    for bias in (rab, rab.masked_fill(~valid, float("nan"))):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias.to(DEVICE))]
        out = hstu_attn_varlen_func(*leaves[:3], _offsets(LENGTHS), max_len, rab=leaves[3], **kwargs)
        out.backward(grad_out)
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for want, got in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
