"""A GPU table left with global_hbm_for_values=0 (every value row in host memory) warns once."""

from __future__ import annotations

import warnings

import pytest
import torch

import dynamicemb.embedding_table as embedding_table
from dynamicemb import DynamicEmbTableOptions, PyDictStorage
from dynamicemb.embedding_table import warn_if_rows_in_host_memory

CUDA = torch.device("cuda", 0)


def test_warns_once_per_process(monkeypatch) -> None:
    monkeypatch.setattr(embedding_table, "_warned_rows_in_host_memory", False)
    with pytest.warns(RuntimeWarning, match=r"table 'items' is on cuda:0 .*global_hbm_for_values is 0"):
        warn_if_rows_in_host_memory("items", CUDA, DynamicEmbTableOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_rows_in_host_memory("other", CUDA, DynamicEmbTableOptions())  # already said


@pytest.mark.parametrize(
    ("device", "options"),
    [
        (torch.device("cpu"), DynamicEmbTableOptions()),  # host memory is the device
        (CUDA, DynamicEmbTableOptions(global_hbm_for_values=1 << 20)),
        (CUDA, DynamicEmbTableOptions(external_storage=PyDictStorage(4))),  # rows in the store, cache on the GPU
    ],
    ids=["cpu", "budget", "external"],
)
def test_no_warning_when_rows_are_where_asked(monkeypatch, device, options) -> None:
    monkeypatch.setattr(embedding_table, "_warned_rows_in_host_memory", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_rows_in_host_memory("items", device, options)
