"""DynamicEmbDump / DynamicEmbLoad / incremental_dump: round trips, corrupt files, crashes mid-dump."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import dynamicemb.dump.standalone as dump_api
from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbFileError,
    DynamicEmbLoad,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
    PyDictStorage,
    dynamic_embedding_lookup,
    get_score,
    incremental_dump,
    set_score,
)
from dynamicemb.dump import TableFile, table_file_path
from dynamicemb.dump.file_format import path_inside

ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
STEP = DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.STEP)


class TwoCollections(nn.Module):
    def __init__(self, dim: int = 4, options: DynamicEmbTableOptions = STEP) -> None:
        super().__init__()
        self.sequence = DynamicEmbeddingCollection(
            tables=[
                EmbeddingConfig(name="users", embedding_dim=dim, num_embeddings=500, feature_names=["u"]),
                EmbeddingConfig(name="items", embedding_dim=dim, num_embeddings=500, feature_names=["i"]),
            ],
            table_options=options,
            optimizer=ADAM,
        )
        self.pooled = DynamicEmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="tags", embedding_dim=3, num_embeddings=100, feature_names=["t"])],
            optimizer=ADAM,
        )

    def train_step(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(-(2**62), 2**62, (12,), generator=generator) % 50
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["u", "i", "t"], values=torch.cat([ids, ids[:5] * 3]), lengths=torch.tensor([4, 2, 3, 3, 1, 4])
        )
        out = self.sequence(features)
        loss = sum(jt.values().square().sum() for jt in out.values()) + self.pooled(features).values().sum()
        loss.backward()


def _rows(table) -> dict[int, tuple]:
    return {
        k: (e.tolist(), s.tolist(), score)
        for keys, emb, state, scores in table.export()
        for k, e, s, score in zip(keys.tolist(), emb, state, scores.tolist())
    }


def _all_rows(model: nn.Module) -> dict:
    return {
        (name, t): _rows(table)
        for name, module in dump_api.find_dynamic_modules(model).items()
        for t, table in module.dynamic_embedding_tables().items()
    }


@pytest.fixture
def trained() -> TwoCollections:
    model = TwoCollections()
    for seed in range(3):
        model.train_step(seed)
    return model


def test_round_trip_restores_rows_scores_optimizer_state_and_step(tmp_path, trained: TwoCollections) -> None:
    DynamicEmbDump(str(tmp_path), trained, optim=True)
    assert sorted(os.listdir(tmp_path)) == ["pooled", "sequence"]
    assert sorted(os.listdir(tmp_path / "sequence")) == ["items.dynamicemb", "users.dynamicemb"]
    restored = TwoCollections()
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    assert _all_rows(restored) == _all_rows(trained)
    table, source = (
        restored.sequence.dynamic_embedding_tables()["users"],
        trained.sequence.dynamic_embedding_tables()["users"],
    )
    assert table.optimizer.step == source.optimizer.step == 3
    assert table.get_score() == source.get_score() == 4  # STEP tables continue after the dumped step
    # Both continue identically (up to the wall-clock scores of the TIMESTAMP table "tags").
    torch.manual_seed(0)
    trained.train_step(9)
    torch.manual_seed(0)
    restored.train_step(9)

    def without_time(rows: dict) -> dict:
        return {t: {k: r[:2] for k, r in table.items()} for t, table in rows.items()}

    assert without_time(_all_rows(restored)) == without_time(_all_rows(trained))


def test_footer_documents_options_and_optimizer(tmp_path, trained: TwoCollections) -> None:
    DynamicEmbDump(str(tmp_path), trained, optim=True)
    footer = TableFile.open(table_file_path(str(tmp_path), "sequence", "users")).footer
    assert footer["table"] == "users" and footer["dim"] == 4 and footer["dtype"] == "float32"
    assert footer["options"]["score_strategy"] == "STEP"
    assert footer["optimizer"]["optimizer"] == "ADAM" and footer["optimizer_state_dim"] == 8
    assert footer["num_rows"] == trained.sequence.dynamic_embedding_tables()["users"].size()
    json.dumps(footer)


def test_load_without_optimizer_state_starts_fresh_state(tmp_path, trained: TwoCollections) -> None:
    DynamicEmbDump(str(tmp_path), trained)
    restored = TwoCollections()
    DynamicEmbLoad(str(tmp_path), restored)
    rows, source = (
        _rows(restored.sequence.dynamic_embedding_tables()["items"]),
        _rows(trained.sequence.dynamic_embedding_tables()["items"]),
    )
    assert rows.keys() == source.keys()
    for key, (embedding, state, score) in rows.items():
        assert embedding == source[key][0] and score == source[key][2]
        assert all(v == 0.0 for v in state)
    with pytest.raises(DynamicEmbFileError, match="no optimizer state"):
        DynamicEmbLoad(str(tmp_path), TwoCollections(), optim=True)


def test_table_names_select_what_is_dumped_and_loaded(tmp_path, trained: TwoCollections) -> None:
    DynamicEmbDump(str(tmp_path), trained, table_names={"sequence": ["items"]})
    assert os.listdir(tmp_path) == ["sequence"] and os.listdir(tmp_path / "sequence") == ["items.dynamicemb"]
    restored = TwoCollections()
    DynamicEmbLoad(str(tmp_path), restored, table_names={"sequence": ["items"]})
    assert restored.sequence.dynamic_embedding_tables()["users"].size() == 0
    with pytest.raises(KeyError, match="no dynamic tables"):
        DynamicEmbDump(str(tmp_path), trained, table_names={"sequence": ["nope"]})
    with pytest.raises(FileNotFoundError, match=r"users\.dynamicemb"):
        DynamicEmbLoad(str(tmp_path), restored)


def test_incremental_dump_returns_rows_touched_since_the_threshold() -> None:
    model = TwoCollections()
    model.train_step(0)
    threshold = get_score(model)
    assert threshold["sequence"] == {"users": 2, "items": 2}
    before = _rows(model.sequence.dynamic_embedding_tables()["users"])
    model.train_step(1)
    dumped, scores = incremental_dump(model, threshold)
    keys, embeddings = dumped["sequence"]["users"]
    after = _rows(model.sequence.dynamic_embedding_tables()["users"])
    touched = sorted(k for k, row in after.items() if row[2] >= 2)
    assert sorted(keys.tolist()) == touched and len(touched) < len(after) + 1
    assert set(before) - set(touched)  # some rows were not touched again and are left out
    for key, embedding in zip(keys.tolist(), embeddings):
        assert embedding.tolist() == after[key][0]
    assert scores["sequence"]["users"] == 3
    everything, _ = incremental_dump(model, 0)
    assert everything["sequence"]["users"][0].numel() == len(after)
    assert set(everything) == {"sequence", "pooled"}


def test_set_score_applies_to_customized_tables() -> None:
    custom = DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    model = TwoCollections(options=custom)
    set_score(model, {"sequence": {"users": 40, "items": 41}})
    model.sequence.train()
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "i"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])
    )
    model.sequence(features)
    assert _rows(model.sequence.dynamic_embedding_tables()["items"])[2][2] == 41
    with pytest.raises(ValueError, match="CUSTOMIZED"):
        set_score(model, 5)  # the pooled collection's table uses TIMESTAMP


# --- corrupt and mismatched files ------------------------------------------------------------------
@pytest.fixture
def dumped(tmp_path, trained: TwoCollections) -> str:
    DynamicEmbDump(str(tmp_path), trained, optim=True)
    return table_file_path(str(tmp_path), "sequence", "users")


def _load_fails(tmp_path, match: str, model: nn.Module | None = None) -> None:
    with pytest.raises(DynamicEmbFileError, match=match) as info:
        DynamicEmbLoad(str(tmp_path), model or TwoCollections(), optim=True)
    assert "users.dynamicemb" in str(info.value)


def test_truncated_file_fails_naming_the_file(tmp_path, dumped: str) -> None:
    data = Path(dumped).read_bytes()
    for keep in (len(data) - 3, len(data) // 2, 10):
        Path(dumped).write_bytes(data[:keep])
        _load_fails(tmp_path, "truncated|corrupt|magic")


def test_bad_footer_json_fails_naming_the_file(tmp_path, dumped: str) -> None:
    data = bytearray(Path(dumped).read_bytes())
    start = data.rindex(b'"table"')
    data[start : start + 7] = b"}{!bad!"[:7]
    Path(dumped).write_bytes(bytes(data))
    _load_fails(tmp_path, "JSON")


def test_flipped_data_byte_fails_the_checksum(tmp_path, dumped: str, trained: TwoCollections) -> None:
    data = bytearray(Path(dumped).read_bytes())
    data[20] ^= 0xFF
    Path(dumped).write_bytes(bytes(data))
    restored = TwoCollections()
    _load_fails(tmp_path, "checksum", restored)
    assert all(not rows for rows in _all_rows(restored).values())  # nothing was loaded


def test_mismatched_dim_or_table_fails_naming_both(tmp_path, dumped: str) -> None:
    _load_fails(tmp_path, "embedding dim 4 in the file, 6 in table 'users'", TwoCollections(dim=6))
    items = table_file_path(str(tmp_path), "sequence", "items")
    os.replace(items, dumped)  # the users file now holds table 'items'
    _load_fails(tmp_path, "holds table 'items', not 'users'")


def test_mismatched_optimizer_fails(tmp_path, dumped: str) -> None:
    model = TwoCollections()
    for table in model.sequence.dynamic_embedding_tables().values():
        table.optimizer.args = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAGRAD)
        table.optimizer.state_dim = 4
    _load_fails(tmp_path, "optimizer state of ADAM", model)


# --- crashes --------------------------------------------------------------------------------------
def test_a_crash_mid_dump_leaves_the_previous_dump_loadable(tmp_path, monkeypatch, trained: TwoCollections) -> None:
    DynamicEmbDump(str(tmp_path), trained, optim=True)
    previous = _all_rows(trained)
    trained.train_step(7)
    real_writer = dump_api.write_table_file
    calls = []

    def crash_after_partial_write(file, table, *, optim):
        calls.append(table.name)
        if len(calls) == 2:
            file.write(b"DYNEMB\x00\x01 partial rows")
            raise OSError("disk went away")
        return real_writer(file, table, optim=optim)

    monkeypatch.setattr(dump_api, "write_table_file", crash_after_partial_write)
    with pytest.raises(OSError, match="disk went away"):
        DynamicEmbDump(str(tmp_path), trained, optim=True)
    leftovers = [name for folder in ("sequence", "pooled") for name in os.listdir(tmp_path / folder)]
    assert sorted(leftovers) == ["items.dynamicemb", "tags.dynamicemb", "users.dynamicemb"]  # no temp files
    restored = TwoCollections()
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    assert _all_rows(restored) == previous


# --- storage tiers: a device cache over a host table, a device + host split ----------------------
TIER_DIM = 4
TIER_ROW_BYTES = TIER_DIM * 3 * 4  # embedding + Adam's two state columns, float32


def _tiered(caching: bool, strategy: DynamicEmbScoreStrategy, **options) -> DynamicEmbeddingCollection:
    options.setdefault("global_hbm_for_values", 64 * TIER_ROW_BYTES)
    options.setdefault("bucket_capacity", 16)
    return DynamicEmbeddingCollection(
        tables=[EmbeddingConfig(name="t", embedding_dim=TIER_DIM, num_embeddings=2048, feature_names=["f"])],
        table_options=DynamicEmbTableOptions(caching=caching, score_strategy=strategy, **options),
        optimizer=ADAM,
    )


def _only_table(module: DynamicEmbeddingCollection):
    return module.dynamic_embedding_tables()["t"]


def _train_tiered(module: DynamicEmbeddingCollection, seeds: range, key_range: int = 1500) -> set[int]:
    """Adam steps on batches of many distinct keys (the cache evicts); returns the keys seen."""
    table = _only_table(module)
    seen: set[int] = set()
    for seed in seeds:
        ids = torch.randint(0, key_range, (300,), generator=torch.Generator().manual_seed(seed))
        dynamic_embedding_lookup(table, ids, training=True).square().sum().backward()
        seen.update(ids.tolist())
    return seen


def _eval_embeddings(module: DynamicEmbeddingCollection, keys: list[int]) -> torch.Tensor:
    return dynamic_embedding_lookup(_only_table(module), torch.tensor(keys), training=False)


def _cached_keys(module: DynamicEmbeddingCollection) -> set[int]:
    return {k for keys, _, _ in _only_table(module).store.cache.dump() for k in keys.tolist()}


def _assert_same_table(restored: DynamicEmbeddingCollection, source: DynamicEmbeddingCollection) -> None:
    """Every key's embedding, optimizer state and score; eval lookups; the optimizer step."""
    rows, source_rows = _rows(_only_table(restored)), _rows(_only_table(source))
    assert sorted(rows) == sorted(source_rows), f"{len(set(source_rows) - set(rows))} rows lost"
    assert rows == source_rows
    keys = sorted(source_rows)
    assert torch.equal(_eval_embeddings(restored, keys), _eval_embeddings(source, keys))
    assert _only_table(restored).optimizer.step == _only_table(source).optimizer.step


@pytest.mark.parametrize(
    "strategy", [DynamicEmbScoreStrategy.TIMESTAMP, DynamicEmbScoreStrategy.LFU], ids=lambda s: s.name
)
def test_cached_table_round_trip_keeps_every_row_and_the_cache(tmp_path, strategy) -> None:
    source = _tiered(True, strategy)
    _train_tiered(source, range(8))
    store = _only_table(source).store
    assert store.cache.size() == store.cache.capacity == 64 and store.backing.size() > 1000  # the cache evicted
    cached_only = _cached_keys(source) - {k for keys, _, _ in store.backing.dump() for k in keys.tolist()}
    assert cached_only  # dirty rows: in the cache, never written back
    DynamicEmbDump(str(tmp_path), source, optim=True)
    restored = _tiered(True, strategy)
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    _assert_same_table(restored, source)
    assert _cached_keys(restored) == _cached_keys(source)  # hot rows are back in the cache
    footer = TableFile.open(table_file_path(str(tmp_path), "_root", "t")).footer
    assert footer["cached_rows"] == 64 and footer["num_rows"] == _only_table(source).size()


def _rewrite_footer(path: str, edit) -> None:
    """Rewrite a dump file's footer as ``edit(footer)`` returns it (the rows stay)."""
    data = Path(path).read_bytes()
    footer_len = int.from_bytes(data[-16:-8], "little")
    footer = json.loads(data[-16 - footer_len : -16])
    encoded = json.dumps(edit(footer)).encode()
    Path(path).write_bytes(data[: -16 - footer_len] + encoded + len(encoded).to_bytes(8, "little") + data[-8:])


def _as_version_1(footer: dict) -> dict:
    del footer["cached_rows"], footer["counter_chunk_rows"]
    return {**footer, "format_version": 1}


def test_a_version_1_dump_of_a_cached_table_loads_every_row(tmp_path) -> None:
    source = _tiered(True, DynamicEmbScoreStrategy.STEP)
    _train_tiered(source, range(8))
    DynamicEmbDump(str(tmp_path), source, optim=True)
    _rewrite_footer(table_file_path(str(tmp_path), "_root", "t"), _as_version_1)
    restored = _tiered(True, DynamicEmbScoreStrategy.STEP)
    # No tiers in the file: every row goes to the host table, and those it cannot hold to the cache.
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    _assert_same_table(restored, source)


def test_uncached_dump_loads_into_a_cached_table_and_back(tmp_path) -> None:
    strategy = DynamicEmbScoreStrategy.STEP
    source = _tiered(False, strategy, global_hbm_for_values=0)
    _train_tiered(source, range(6), key_range=700)
    DynamicEmbDump(str(tmp_path / "plain"), source, optim=True)
    cached = _tiered(True, strategy)
    DynamicEmbLoad(str(tmp_path / "plain"), cached, optim=True)
    assert _only_table(cached).store.cache.size() == 0  # the file has no cached rows
    _assert_same_table(cached, source)
    _train_tiered(cached, range(10, 12), key_range=700)  # the cache fills and evicts again
    assert _only_table(cached).store.cache.size() == 64
    DynamicEmbDump(str(tmp_path / "cached"), cached, optim=True)
    plain = _tiered(False, strategy, global_hbm_for_values=0)
    DynamicEmbLoad(str(tmp_path / "cached"), plain, optim=True)
    _assert_same_table(plain, cached)


def test_device_and_host_split_round_trip(tmp_path) -> None:
    strategy = DynamicEmbScoreStrategy.TIMESTAMP
    source = _tiered(False, strategy, global_hbm_for_values=100 * TIER_ROW_BYTES, init_capacity=256)
    _train_tiered(source, range(6))
    assert _only_table(source).store.values.device_rows == 100 and _only_table(source).capacity == 2048
    DynamicEmbDump(str(tmp_path), source, optim=True)
    restored = _tiered(False, strategy, global_hbm_for_values=100 * TIER_ROW_BYTES, init_capacity=256)
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    _assert_same_table(restored, source)


def test_incremental_dump_of_a_cached_table_returns_rows_touched_in_either_tier() -> None:
    module = _tiered(True, DynamicEmbScoreStrategy.STEP)
    _train_tiered(module, range(4))
    threshold = get_score(module)["_root"]["t"]
    touched = _train_tiered(module, range(10, 13))  # 900 lookups: most touched rows leave the cache
    store = _only_table(module).store
    assert len(touched - _cached_keys(module)) > 500
    dumped, scores = incremental_dump(module, threshold)
    keys, embeddings = dumped["_root"]["t"]
    assert sorted(keys.tolist()) == sorted(touched)
    assert torch.equal(embeddings, _eval_embeddings(module, keys.tolist()))
    assert scores["_root"]["t"] == threshold + 3
    assert store.size() > len(touched)  # older rows were left out


def test_a_load_that_cannot_store_every_row_warns(tmp_path) -> None:
    source = _tiered(False, DynamicEmbScoreStrategy.STEP, global_hbm_for_values=0)
    _train_tiered(source, range(4), key_range=700)
    DynamicEmbDump(str(tmp_path), source)
    small = _tiered(False, DynamicEmbScoreStrategy.STEP, global_hbm_for_values=0, max_capacity=256)
    with pytest.warns(RuntimeWarning, match=r"t\.dynamicemb: \d+ of \d+ rows could not be stored in table 't'"):
        DynamicEmbLoad(str(tmp_path), small)
    assert _only_table(small).size() <= 256


def test_cached_rows_outside_the_file_fail_naming_the_file(tmp_path) -> None:
    source = _tiered(True, DynamicEmbScoreStrategy.STEP)
    _train_tiered(source, range(2))
    DynamicEmbDump(str(tmp_path), source)
    path = table_file_path(str(tmp_path), "_root", "t")
    _rewrite_footer(path, lambda footer: {**footer, "cached_rows": footer["num_rows"] + 1})
    with pytest.raises(DynamicEmbFileError, match=r"t\.dynamicemb: corrupt footer: cached_rows"):
        DynamicEmbLoad(str(tmp_path), _tiered(True, DynamicEmbScoreStrategy.STEP))


def test_external_storage_round_trip_restores_the_cache_and_the_store(tmp_path) -> None:
    def module() -> DynamicEmbeddingCollection:
        return _tiered(False, DynamicEmbScoreStrategy.STEP, external_storage=PyDictStorage(value_dim=3 * TIER_DIM))

    source = module()
    _train_tiered(source, range(3), key_range=400)
    assert _only_table(source).store.backing.size() > 100
    DynamicEmbDump(str(tmp_path), source, optim=True)
    restored = module()
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    _assert_same_table(restored, source)
    assert _cached_keys(restored) == _cached_keys(source)


# --- dumps from an untrusted folder: nothing unpickled, no name reaches outside the dump -------------
def test_load_unpickles_nothing(tmp_path: Path, trained: TwoCollections, monkeypatch: pytest.MonkeyPatch) -> None:
    DynamicEmbDump(str(tmp_path), trained, optim=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("dump loading unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    restored = TwoCollections()
    DynamicEmbLoad(str(tmp_path), restored, optim=True)
    assert _all_rows(restored) == _all_rows(trained)


def test_a_table_file_linked_outside_the_dump_is_refused(tmp_path: Path, trained: TwoCollections) -> None:
    dump, elsewhere = tmp_path / "dump", tmp_path / "elsewhere"
    DynamicEmbDump(str(dump), trained, optim=True)
    elsewhere.mkdir()
    table_file = dump / "sequence" / "users.dynamicemb"
    shutil.move(table_file, elsewhere / "users.dynamicemb")
    table_file.symlink_to(elsewhere / "users.dynamicemb")
    restored = TwoCollections()
    before = _all_rows(restored)
    with pytest.raises(DynamicEmbFileError, match=r"'users.dynamicemb' resolves to .*elsewhere.*, outside"):
        DynamicEmbLoad(str(dump), restored, optim=True)
    assert _all_rows(restored) == before


@pytest.mark.parametrize("name", ["../users.dynamicemb", "/etc/passwd", "..", "a/b", ""])
def test_names_read_from_a_manifest_must_be_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(DynamicEmbFileError, match=r"sharded_manifest.json: names .* not a plain file name"):
        path_inside(str(tmp_path), name, "sharded_manifest.json")
    assert path_inside(str(tmp_path), "items.shard-0-of-2.dynamicemb", "m") == str(
        tmp_path / "items.shard-0-of-2.dynamicemb"
    )
