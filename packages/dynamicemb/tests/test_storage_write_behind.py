"""WriteBehindStorage: queued rows are read back before they are written, the queue is bounded,
and a failed background write is reported, not lost. (The storage suite runs it over RocksDB too.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dynamicemb.storage import PyDictStorage, StorageError, WriteBehindStorage


class GatedStorage(PyDictStorage):
    """A dict storage whose inserts wait for ``gate`` (and fail while ``fail`` is set)."""

    def __init__(self, value_dim: int) -> None:
        super().__init__(value_dim)
        self.gate = threading.Event()
        self.fail = False
        self.inserting = threading.Event()

    def insert(self, keys, values, scores=None) -> None:
        self.inserting.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail:
            raise OSError("disk gone")
        super().insert(keys, values, scores)


def _rows(keys: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((keys.numel(), 2), value)


def test_queued_rows_are_read_back_before_they_are_written() -> None:
    inner = GatedStorage(2)
    storage = WriteBehindStorage(inner)
    storage.insert(torch.tensor([3, 1]), _rows(torch.tensor([3, 1]), 1.0), torch.tensor([5, 5]))
    storage.insert(torch.tensor([1, 2]), _rows(torch.tensor([1, 2]), 2.0), torch.tensor([6, 6]))  # 1 again: newer
    assert inner.inserting.wait(10) and inner.size() == 0  # nothing written yet
    values, found = storage.find(torch.tensor([1, 2, 3, 4]))
    assert found.tolist() == [True, True, True, False]
    assert values[:, 0].tolist() == [2.0, 2.0, 1.0, 0.0]
    inner.gate.set()
    storage.flush()
    assert inner.size() == 3 and storage.find(torch.tensor([1]))[0][0, 0].item() == 2.0
    assert {k: s for keys, _, scores in storage.dump() for k, s in zip(keys.tolist(), scores.tolist())} == {
        1: 6,
        2: 6,
        3: 5,
    }
    storage.close()


def test_the_queue_is_bounded() -> None:
    inner = GatedStorage(2)
    storage = WriteBehindStorage(inner, max_pending_rows=4)
    storage.insert(torch.arange(3), _rows(torch.arange(3), 1.0), torch.zeros(3, dtype=torch.int64))
    second = threading.Thread(
        target=storage.insert, args=(torch.arange(3, 6), _rows(torch.arange(3), 2.0), torch.zeros(3, dtype=torch.int64))
    )
    second.start()
    time.sleep(0.2)
    assert second.is_alive()  # 3 + 3 rows would pass the bound of 4: the insert waits
    inner.gate.set()
    second.join(10)
    assert not second.is_alive()
    storage.flush()
    assert inner.size() == 6
    storage.close()


def test_a_failed_background_write_is_reported_and_its_rows_stay_queued() -> None:
    inner = GatedStorage(2)
    inner.fail = True
    storage = WriteBehindStorage(inner)
    storage.insert(torch.tensor([7]), _rows(torch.tensor([7]), 3.0), torch.tensor([1]))
    inner.gate.set()
    with pytest.raises(StorageError, match=r"background write to GatedStorage failed.*OSError: disk gone"):
        storage.flush()
    with pytest.raises(StorageError, match="still queued"):
        storage.insert(torch.tensor([8]), _rows(torch.tensor([8]), 1.0), torch.tensor([1]))
    assert storage.pending_rows == 1  # not dropped
    with pytest.raises(StorageError):
        storage.close()
