"""DynamicEmbDump(blocking=False): the dump holds the tables as they were at the call, while
training goes on; a failing writer is reported by wait() and leaves the previous dump whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig

import dynamicemb.dump.file_format as file_format
from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingCollection,
    DynamicEmbLoad,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    PyDictStorage,
    dynamic_embedding_lookup,
)
from dynamicemb.dump import PendingDump, table_file_path

DIM = 4


def _module() -> DynamicEmbeddingCollection:
    """Adam; a device cache of 32 rows in front of a dict storage (rows in both tiers)."""
    options = DynamicEmbTableOptions(
        bucket_capacity=8,
        global_hbm_for_values=32 * 3 * DIM * 4,
        external_storage=PyDictStorage(3 * DIM),
        max_capacity=512,
    )
    config = EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=512, feature_names=["f"])
    adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
    return DynamicEmbeddingCollection(tables=[config], table_options=options, optimizer=adam)


def _train(module: DynamicEmbeddingCollection, seeds: range) -> None:
    table = module.dynamic_embedding_tables()["t"]
    for seed in seeds:
        ids = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(seed))
        dynamic_embedding_lookup(table, ids, training=True).square().sum().backward()


def _rows(module: DynamicEmbeddingCollection) -> dict[int, tuple[list[float], list[float], int]]:
    table = module.dynamic_embedding_tables()["t"]
    return {
        k: (e.tolist(), s.tolist(), c)
        for keys, emb, state, scores in table.export()
        for k, e, s, c in zip(keys.tolist(), emb, state, scores.tolist())
    }


def test_the_dump_holds_the_tables_as_they_were_at_the_call(tmp_path) -> None:
    source = _module()
    _train(source, range(3))
    at_call, step_at_call = _rows(source), source.dynamic_embedding_tables()["t"].optimizer.step
    pending = DynamicEmbDump(str(tmp_path), source, optim=True, blocking=False)
    assert isinstance(pending, PendingDump)
    _train(source, range(3, 6))  # training goes on while the files are written
    pending.wait(timeout=60)
    assert pending.done()
    assert _rows(source) != at_call
    restored = _module()
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    assert _rows(restored) == at_call
    assert restored.dynamic_embedding_tables()["t"].optimizer.step == step_at_call


def test_a_failing_writer_is_reported_and_the_previous_dump_stays(tmp_path, monkeypatch) -> None:
    source = _module()
    _train(source, range(2))
    DynamicEmbDump(str(tmp_path), source)
    path = table_file_path(str(tmp_path), "_root", "t")
    before = Path(path).read_bytes()
    _train(source, range(2, 4))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_format, "_write_chunks", full_disk)
    pending = DynamicEmbDump(str(tmp_path), source, blocking=False)
    with pytest.raises(OSError, match="No space left"):
        pending.wait(timeout=60)
    assert Path(path).read_bytes() == before
    assert os.listdir(os.path.dirname(path)) == ["t.dynamicemb"]  # no temporary file left
