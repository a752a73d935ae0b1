"""gather_rows and scatter_rows (Triton kernels and torch paths) against plain indexing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dynamicemb.table.gather import gather_rows, scatter_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(slots.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    hit = slots >= 0
    out[hit] = values[slots[hit]]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim", "n"), [(50, 1, 1), (37, 7, 33), (64, 130, 40), (9, 16, 0)])
@pytest.mark.parametrize("use_triton", [True, False])
def test_gather_rows_matches_indexing(dtype, rows: int, dim: int, n: int, use_triton: bool) -> None:
    g = torch.Generator().manual_seed(rows * dim + n)
    values = torch.randn(rows, dim, generator=g).to(dtype=dtype, device=DEVICE)
    slots = torch.randint(-1, rows, (n,), generator=g).to(DEVICE)
    got = gather_rows(values, slots, use_triton=use_triton)
    assert got.shape == (n, dim) and got.dtype == dtype
    assert torch.equal(got, reference(values, slots))


def test_gather_rows_reads_a_strided_view() -> None:
    values = torch.randn(20, 12, device=DEVICE)[:, 2:9]
    slots = torch.tensor([3, -1, 19, 0], device=DEVICE)
    assert torch.equal(gather_rows(values, slots, use_triton=True), reference(values, slots))


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 128, 129])
def test_gather_rows_large_gpu(dim: int) -> None:
    values = torch.randn(1 << 20, dim, device="cuda")
    slots = torch.randint(-1, 1 << 20, (1 << 20,), device="cuda")
    assert torch.equal(gather_rows(values, slots), reference(values, slots))


@pytest.mark.parametrize(
    ("values", "slots", "message"),
    [
        (torch.zeros(4), torch.zeros(2, dtype=torch.int64), "2-D"),
        (torch.zeros(4, 2), torch.zeros(2, dtype=torch.int32), "int64"),
        (torch.zeros(4, 2), torch.zeros(2, dtype=torch.int64, device="meta"), "slots are on"),
    ],
)
def test_gather_rows_bad_input(values, slots, message) -> None:
    with pytest.raises(ValueError, match=message):
        gather_rows(values, slots)


def distinct_slots_with_skips(capacity: int, n: int, g: torch.Generator) -> torch.Tensor:
    slots = torch.randperm(capacity, generator=g)[:n]
    return torch.where(torch.rand(n, generator=g) < 0.25, -1, slots).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("capacity", "dim", "n"), [(50, 1, 1), (37, 7, 33), (300, 130, 200), (9, 16, 0)])
@pytest.mark.parametrize("use_triton", [True, False])
def test_scatter_rows_matches_indexing(dtype, capacity: int, dim: int, n: int, use_triton: bool) -> None:
    g = torch.Generator().manual_seed(capacity * dim + n)
    values = torch.randn(capacity, dim, generator=g).to(dtype=dtype, device=DEVICE)
    slots = distinct_slots_with_skips(capacity, n, g)
    rows = torch.randn(n, dim, generator=g, dtype=torch.float64).to(DEVICE)  # cast to the values' dtype
    expected = values.clone()
    placed = slots >= 0
    expected[slots[placed]] = rows[placed].to(dtype)
    scatter_rows(values, slots, rows, use_triton=use_triton)
    assert torch.equal(values, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 128, 129])
def test_scatter_rows_large_gpu(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    values = torch.randn(1 << 20, dim, device="cuda")
    slots = distinct_slots_with_skips(1 << 20, 1 << 19, g)
    rows = torch.randn(1 << 19, dim, device="cuda")
    expected = values.clone()
    expected[slots[slots >= 0]] = rows[slots >= 0]
    scatter_rows(values, slots, rows)
    assert torch.equal(values, expected)


@pytest.mark.parametrize(
    ("values", "slots", "rows", "message"),
    [
        (torch.zeros(4), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 1), "values \\[C, D\\]"),
        (torch.zeros(4, 2), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3), "rows \\[N, D\\]"),
        (torch.zeros(4, 2), torch.zeros(2, dtype=torch.int32), torch.zeros(2, 2), "int64"),
        (torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 2), "of 2 entries"),
        (torch.zeros(4, 2), torch.zeros(2, dtype=torch.int64, device="meta"), torch.zeros(2, 2), "device"),
    ],
)
def test_scatter_rows_bad_input(values, slots, rows, message) -> None:
    with pytest.raises(ValueError, match=message):
        scatter_rows(values, slots, rows)
