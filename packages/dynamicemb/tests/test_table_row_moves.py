"""gather_rows and scatter_rows (Triton kernels and torch paths) and their split-store variants
against plain indexing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dynamicemb.storage.row_moves import gather_rows, gather_split_rows, scatter_rows, scatter_split_rows

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


# --- rows split between device memory and (pinned) host memory -----------------------------------
def split_parts(capacity: int, device_rows: int, dim: int, dtype, g: torch.Generator):
    whole = torch.randn(capacity, dim, generator=g).to(dtype)
    host = whole[device_rows:].clone()
    if DEVICE.type == "cuda":
        host = host.pin_memory()
    return whole.to(DEVICE), whole[:device_rows].to(DEVICE), host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("capacity", "device_rows", "dim", "n"),
    [(50, 0, 1, 1), (37, 11, 7, 33), (64, 63, 130, 40), (30, 12, 16, 0), (9, 4, 5, 64)],
)
def test_gather_split_rows_matches_indexing(dtype, capacity: int, device_rows: int, dim: int, n: int) -> None:
    g = torch.Generator().manual_seed(capacity * dim + n + device_rows)
    whole, near, far = split_parts(capacity, device_rows, dim, dtype, g)
    slots = torch.randint(-1, capacity, (n,), generator=g).to(DEVICE)
    got = gather_split_rows(near, far, slots)
    assert got.shape == (n, dim) and got.dtype == dtype and got.device == whole.device
    assert torch.equal(got, reference(whole, slots))


def test_gather_split_rows_reads_leading_columns() -> None:
    g = torch.Generator().manual_seed(3)
    whole, near, far = split_parts(20, 6, 12, torch.float32, g)
    slots = torch.tensor([3, -1, 19, 0, 6, 5], device=DEVICE)
    got = gather_split_rows(near[:, :5], far[:, :5], slots)
    assert torch.equal(got, reference(whole[:, :5], slots))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("capacity", "device_rows", "dim", "n"), [(50, 0, 1, 1), (37, 11, 7, 30), (300, 150, 130, 200), (9, 3, 16, 0)]
)
def test_scatter_split_rows_matches_indexing(dtype, capacity: int, device_rows: int, dim: int, n: int) -> None:
    g = torch.Generator().manual_seed(capacity * dim + n)
    whole, near, far = split_parts(capacity, device_rows, dim, dtype, g)
    slots = distinct_slots_with_skips(capacity, n, g)
    rows = torch.randn(n, dim, generator=g, dtype=torch.float64).to(DEVICE)  # cast to the parts' dtype
    expected = whole.clone()
    placed = slots >= 0
    expected[slots[placed]] = rows[placed].to(dtype)
    scatter_split_rows(near, far, slots, rows)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(torch.cat([near, far.to(DEVICE)]), expected)


@pytest.mark.parametrize(
    ("device_part", "host_part", "slots", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(1, dtype=torch.int64), "one width"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.int64), "float64"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, dtype=torch.int32), "int64"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, dtype=torch.int64, device="meta"), "slots are on"),
        (torch.zeros(2, 3), torch.zeros(3, 2).t(), torch.zeros(1, dtype=torch.int64), "unit column stride"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), torch.zeros(1, dtype=torch.int64), "host memory"),
    ],
)
def test_split_rows_bad_input(device_part, host_part, slots, message) -> None:
    with pytest.raises(ValueError, match=message):
        gather_split_rows(device_part, host_part, slots)


def test_scatter_split_rows_checks_the_rows() -> None:
    slots = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="one per slot"):
        scatter_split_rows(torch.zeros(2, 3), torch.zeros(2, 3), slots, torch.zeros(3, 3))


@pytest.mark.gpu
def test_split_rows_reach_unpinned_host_memory_only_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="pinned"):
        gather_split_rows(
            torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3), torch.zeros(1, dtype=torch.int64, device="cuda")
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 384])
def test_split_rows_large_gpu(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    capacity = 1 << 20
    whole, near, far = split_parts(capacity, capacity // 4, dim, torch.float32, g)
    slots = torch.randint(-1, capacity, (1 << 18,), generator=g).cuda()
    assert torch.equal(gather_split_rows(near, far, slots), reference(whole, slots))
    slots = distinct_slots_with_skips(capacity, 1 << 18, g)
    rows = torch.randn(1 << 18, dim, device="cuda")
    whole[slots[slots >= 0]] = rows[slots >= 0]
    scatter_split_rows(near, far, slots, rows)
    torch.cuda.synchronize()
    assert torch.equal(torch.cat([near, far.cuda()]), whole)
