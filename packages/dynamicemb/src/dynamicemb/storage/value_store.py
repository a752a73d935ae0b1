"""Value rows indexed by slot: all in device memory, or split between device and host memory."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch

from dynamicemb.hash_index.base import SlotRemap
from dynamicemb.masks import positions

__all__ = [
    "DeviceValueStore",
    "SplitValueStore",
    "ValueStore",
    "create_value_store",
    "kernels_reach_pinned_memory",
    "resize_value_store",
]

_COPY_CHUNK_ROWS = 1 << 20


class ValueStore(ABC):
    """``capacity`` rows of ``row_dim`` columns; row ``s`` holds the value of the key in slot ``s``.

    Slots and returned rows live on the compute ``device`` whatever the tier of the rows.
    """

    capacity: int
    row_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    @abstractmethod
    def device_rows(self) -> int:
        """Rows held in device memory (the others are in host memory)."""

    @abstractmethod
    def read(self, slots: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        """``slots [N]`` int64 in ``[0, capacity)`` -> ``[N, columns or row_dim]`` (the leading columns)."""

    @abstractmethod
    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows [N, row_dim]`` into distinct ``slots [N]``."""

    def write_placed(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows [N, row_dim]`` into the distinct ``slots [N]`` that are ``>= 0`` (``-1``: skipped)."""
        placed = positions(slots >= 0)
        self.write(slots[placed], rows[placed])

    def memory_bytes(self) -> tuple[int, int]:
        """``(device bytes, host bytes)`` held by the rows."""
        row_bytes = self.row_dim * self.dtype.itemsize
        return self.device_rows * row_bytes, (self.capacity - self.device_rows) * row_bytes


class DeviceValueStore(ValueStore):
    """Every row in one ``[capacity, row_dim]`` tensor on the compute device."""

    def __init__(self, capacity: int, row_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity, self.row_dim, self.dtype, self.device = capacity, row_dim, dtype, device
        self.rows = torch.zeros((capacity, row_dim), dtype=dtype, device=device)

    @property
    def device_rows(self) -> int:
        return self.capacity

    def read(self, slots: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        source = self.rows if columns is None or columns == self.row_dim else self.rows[:, :columns]
        if self.device.type == "cuda":
            from dynamicemb.storage.row_moves import gather_rows  # wide-load Triton gather

            return gather_rows(source, slots)
        return source.index_select(0, slots)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.rows.index_copy_(0, slots, rows.to(self.dtype))

    def write_placed(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        from dynamicemb.storage.row_moves import scatter_rows  # one Triton kernel on CUDA, no compaction

        scatter_rows(self.rows, slots, rows)


class SplitValueStore(ValueStore):
    """Slots ``[0, device_rows)`` in device memory, the rest in host memory (pinned on CUDA).

    ``host_access`` says how a CUDA device reaches the host rows: ``"kernel"`` (default on CUDA when
    the device can map pinned host memory) reads and writes both parts with one Triton kernel each,
    the host rows crossing the bus inside the kernel, without a host synchronization; ``"copy"``
    selects the host rows on the host and copies them (a synchronization per call). On the CPU both
    parts are host memory and the rows move with torch indexing.
    """

    def __init__(
        self,
        capacity: int,
        row_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        device_rows: int,
        host_access: str | None = None,
    ) -> None:
        if not 0 <= device_rows < capacity:
            raise ValueError(f"SplitValueStore: device_rows {device_rows} must be in [0, {capacity})")
        if host_access not in (None, "kernel", "copy"):
            raise ValueError(f"SplitValueStore: host_access must be 'kernel', 'copy' or None, got {host_access!r}")
        if host_access == "kernel" and device.type != "cuda":
            raise ValueError(f"SplitValueStore: host_access='kernel' needs a CUDA device, got {device}")
        self.capacity, self.row_dim, self.dtype, self.device = capacity, row_dim, dtype, device
        self._device_rows = device_rows
        self.device_part = torch.zeros((device_rows, row_dim), dtype=dtype, device=device)
        self.host_part = torch.zeros((capacity - device_rows, row_dim), dtype=dtype, pin_memory=device.type == "cuda")
        if host_access is None:
            host_access = "kernel" if device.type == "cuda" and kernels_reach_pinned_memory(device) else "copy"
        self.host_access = host_access

    @property
    def device_rows(self) -> int:
        return self._device_rows

    def _split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        on_device = (slots >= 0) & (slots < self._device_rows)
        return positions(on_device), positions(slots >= self._device_rows)

    def read(self, slots: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        cols = self.row_dim if columns is None else columns
        if self.host_access == "kernel":
            from dynamicemb.storage.row_moves import gather_split_rows

            return gather_split_rows(self.device_part[:, :cols], self.host_part[:, :cols], slots)
        out = torch.zeros((slots.numel(), cols), dtype=self.dtype, device=self.device)
        device_pos, host_pos = self._split(slots)
        if device_pos.numel():
            out.index_copy_(0, device_pos, self.device_part[:, :cols].index_select(0, slots[device_pos]))
        if host_pos.numel():
            host_slots = (slots[host_pos] - self._device_rows).cpu()
            rows = self.host_part[:, :cols].index_select(0, host_slots)
            out.index_copy_(0, host_pos, rows.to(self.device, non_blocking=True))
        return out

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if self.host_access == "kernel":
            from dynamicemb.storage.row_moves import scatter_split_rows

            scatter_split_rows(self.device_part, self.host_part, slots, rows)
            return
        rows = rows.to(self.dtype)
        device_pos, host_pos = self._split(slots)
        if device_pos.numel():
            self.device_part.index_copy_(0, slots[device_pos], rows[device_pos])
        if host_pos.numel():
            host_slots = (slots[host_pos] - self._device_rows).cpu()
            self.host_part.index_copy_(0, host_slots, rows[host_pos].cpu())

    def write_placed(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if self.host_access == "kernel":
            self.write(slots, rows)  # the kernel skips slot -1
        else:
            super().write_placed(slots, rows)


@functools.cache
def kernels_reach_pinned_memory(device: torch.device) -> bool:
    """Whether a Triton kernel on CUDA ``device`` reads and writes pinned host memory correctly (mapped
    into the device's address space): checked once per device on a few rows. ``False`` without Triton."""
    try:
        from dynamicemb.storage.row_moves import gather_split_rows, scatter_split_rows

        host = torch.arange(12, dtype=torch.float32).reshape(4, 3).pin_memory()
        near = torch.full((1, 3), -1.0, device=device)
        slots = torch.tensor([2, 0, -1, 4], device=device)
        got = gather_split_rows(near, host, slots)
        scatter_split_rows(near, host, torch.tensor([3], device=device), torch.full((1, 3), 7.0, device=device))
        torch.cuda.synchronize(device)
    except (ImportError, RuntimeError, ValueError):
        return False
    expected = torch.tensor([[3.0, 4.0, 5.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [9.0, 10.0, 11.0]])
    return torch.equal(got.cpu(), expected) and torch.equal(host[2], torch.full((3,), 7.0))


def create_value_store(
    capacity: int, row_dim: int, dtype: torch.dtype, device: torch.device, device_budget_bytes: int | None
) -> ValueStore:
    """A store of ``capacity`` rows; ``device_budget_bytes`` ``None`` keeps every row on ``device``,
    otherwise rows beyond the budget go to host memory."""
    if device_budget_bytes is None:
        return DeviceValueStore(capacity, row_dim, dtype, device)
    row_bytes = max(row_dim * dtype.itemsize, 1)
    device_rows = min(device_budget_bytes // row_bytes, capacity)
    if device_rows == capacity:
        return DeviceValueStore(capacity, row_dim, dtype, device)
    return SplitValueStore(capacity, row_dim, dtype, device, device_rows)


def resize_value_store(old: ValueStore, remap: SlotRemap, device_budget_bytes: int | None) -> ValueStore:
    """A store of ``remap.new_capacity`` rows holding ``old``'s rows moved as ``remap`` says."""
    new = create_value_store(remap.new_capacity, old.row_dim, old.dtype, old.device, device_budget_bytes)
    for start in range(0, remap.old_slots.numel(), _COPY_CHUNK_ROWS):
        stop = start + _COPY_CHUNK_ROWS
        new.write(remap.new_slots[start:stop], old.read(remap.old_slots[start:stop]))
    return new
