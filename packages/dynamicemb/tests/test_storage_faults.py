"""Faults of the stores below host memory: a Redis server killed mid-training, RocksDB directories
that are locked, read-only, full or corrupted, a process killed while it flushes."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingCollection,
    DynamicEmbLoad,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    dynamic_embedding_lookup,
)
from dynamicemb.storage import Storage, StorageError
from dynamicemb.storage.redis_server import LocalRedisServer, find_redis_server

DIM = 4
ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)


def _collection(storage: Storage) -> DynamicEmbeddingCollection:
    """One Adam table (value rows of 3 * DIM) with a device cache of 32 rows in front of ``storage``."""
    options = DynamicEmbTableOptions(
        bucket_capacity=8, global_hbm_for_values=32 * 3 * DIM * 4, external_storage=storage, max_capacity=512
    )
    config = EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=512, feature_names=["f"])
    return DynamicEmbeddingCollection(tables=[config], table_options=options, optimizer=ADAM)


def _train_step(module: DynamicEmbeddingCollection, seed: int) -> None:
    ids = torch.randint(0, 400, (150,), generator=torch.Generator().manual_seed(seed))
    dynamic_embedding_lookup(module.dynamic_embedding_tables()["t"], ids, training=True).square().sum().backward()


def _rows_of(module: DynamicEmbeddingCollection) -> dict[int, tuple[list[float], list[float], int]]:
    """Every row (embedding, optimizer state, score) by key; fails on a key exported twice."""
    rows = {}
    for keys, embeddings, state, scores in module.dynamic_embedding_tables()["t"].export():
        for key, embedding, row_state, score in zip(keys.tolist(), embeddings, state, scores.tolist()):
            assert key not in rows, f"key {key} exported twice"
            rows[key] = (embedding.tolist(), row_state.tolist(), score)
    return rows


# --- Redis ------------------------------------------------------------------------------------------
@pytest.fixture
def own_redis_server(tmp_path) -> LocalRedisServer:
    """A redis-server for one test (which may kill and restart it)."""
    if find_redis_server() is None:
        pytest.skip("redis-server not found on PATH or in /usr/bin, /usr/sbin (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="the redis client is the optional extra dynamicemb[redis]")
    server = LocalRedisServer(directory=str(tmp_path / "redis")).start()
    yield server
    server.stop()


def test_redis_killed_mid_training_fails_fast_and_the_last_dump_reloads_every_row(own_redis_server, tmp_path) -> None:
    from dynamicemb.storage import RedisStorage

    def storage() -> RedisStorage:
        return RedisStorage(3 * DIM, port=own_redis_server.port, prefix="faults", timeout_s=1.0, retries=2)

    source = _collection(storage())
    for seed in range(3):
        _train_step(source, seed)
    DynamicEmbDump(str(tmp_path / "dump"), source, optim=True)
    dumped = _rows_of(source)
    _train_step(source, 3)  # trained on after the dump
    own_redis_server.kill()
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"Redis at 127\.0\.0\.1:{own_redis_server.port}/0 .*gave up after 2"):
        _train_step(source, 4)
    elapsed = time.monotonic() - start
    assert elapsed < min(source.dynamic_embedding_tables()["t"].store.backing.max_wait_s, 10.0)

    own_redis_server.start()  # same port, no data (the server keeps nothing across restarts)
    restored_storage = storage()
    assert restored_storage.size() == 0
    restored = _collection(restored_storage)
    DynamicEmbLoad(str(tmp_path / "dump"), restored, optim=True)
    assert _rows_of(restored) == dumped  # no row lost, none twice (_rows_of checks)
    cached = restored.dynamic_embedding_tables()["t"].store.cache.size()
    assert restored_storage.size() == len(dumped) - cached > 0
    _train_step(restored, 4)  # and training goes on


def test_redis_refuses_a_server_that_would_evict_rows(own_redis_server) -> None:
    import redis

    from dynamicemb.storage import RedisStorage

    client = redis.Redis(port=own_redis_server.port)
    client.config_set("maxmemory", 64 << 20)
    client.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(StorageError, match=r"allkeys-lru.*drop embedding rows"):
        RedisStorage(4, port=own_redis_server.port, prefix="evicting")
    assert RedisStorage(4, port=own_redis_server.port, prefix="evicting", allow_evicting_server=True).size() == 0


def test_a_full_redis_server_fails_writes_with_an_error(own_redis_server) -> None:
    import redis

    from dynamicemb.storage import RedisStorage

    storage = RedisStorage(256, port=own_redis_server.port, prefix="full")
    redis.Redis(port=own_redis_server.port).config_set("maxmemory", 4 << 20)  # noeviction: the default policy
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{own_redis_server.port}/0 .*cannot write: OutOfMemoryError"):
        for start in range(0, 40000, 4000):  # 40 MB of rows
            storage.insert(
                torch.arange(start, start + 4000), torch.ones(4000, 256), torch.zeros(4000, dtype=torch.int64)
            )


def test_redis_unreachable_names_the_address_within_the_bound() -> None:
    pytest.importorskip("redis", reason="the redis client is the optional extra dynamicemb[redis]")
    from dynamicemb.storage import RedisStorage
    from dynamicemb.storage.redis_server import _free_port

    port = _free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{port}/0.*cannot connect.*gave up after 1 retries"):
        RedisStorage(4, port=port, timeout_s=0.5, retries=1, backoff_s=0.01)
    assert time.monotonic() - start < 2 * 2 * 0.5 + 0.01 + 1.0


def test_redis_flush_can_ask_the_server_for_a_snapshot(own_redis_server) -> None:
    from dynamicemb.storage import RedisStorage

    storage = RedisStorage(2, port=own_redis_server.port, prefix="snap", save_on_flush=True)
    storage.insert(torch.tensor([1, 2]), torch.ones(2, 2))
    storage.flush()
    assert os.path.getsize(os.path.join(own_redis_server.directory, "dump.rdb")) > 0


# --- RocksDB ------------------------------------------------------------------------------------------
@pytest.fixture
def rocksdb_storage() -> Callable[..., Storage]:
    pytest.importorskip("rocksdict", reason="rocksdict is the optional extra dynamicemb[rocksdb]")
    from dynamicemb.storage import RocksDBStorage

    return RocksDBStorage


def _filled(make: Callable[..., Storage], path: Path, rows: int = 1000) -> None:
    with make(path, 4) as storage:
        storage.insert(torch.arange(rows), torch.randn(rows, 4), torch.arange(rows))
        storage.flush()


def _names(path: Path) -> str:
    return re.escape(str(path))


def test_rocksdb_locked_directory_names_the_path(rocksdb_storage, tmp_path) -> None:
    path = tmp_path / "db"
    with rocksdb_storage(path, 4):
        with pytest.raises(StorageError, match=rf"RocksDB at {_names(path)}: cannot open: it is locked"):
            rocksdb_storage(path, 4)
        with rocksdb_storage(path, 4, read_only=True) as reader:  # readers need no lock
            assert reader.size() == 0


def test_rocksdb_other_rows_in_the_directory_name_the_path(rocksdb_storage, tmp_path) -> None:
    _filled(rocksdb_storage, tmp_path / "db")
    with pytest.raises(StorageError, match=rf"{_names(tmp_path / 'db')}: holds rows of 4 x float32.*needs 6 x float32"):
        rocksdb_storage(tmp_path / "db", 6)


def _in_child(statements: str, *, as_nobody: bool = False, file_size_limit: int | None = None) -> str:
    """Run ``statements`` (Python, with ``RocksDBStorage``, ``torch`` and ``Path`` in scope; the last one
    assigns ``result``) in a fresh interpreter, optionally as user nobody or with a file size limit, and
    return ``result`` or the exception it raised as ``Type: message``. A fresh interpreter, not a fork:
    a forked child of a process that has had a RocksDB open crashes (RocksDB's threads are not
    fork-safe). The child leaves with ``os._exit`` so that RocksDB is never closed (closing flushes)."""
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        import torch
        from dynamicemb.storage import RocksDBStorage
        if {as_nobody}:  # after the imports, which user nobody may not be able to read
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        try:
        {body}
        except BaseException as exc:
            result = f"{{type(exc).__name__}}: {{exc}}"
        sys.stdout.write(result)
        sys.stdout.flush()
        os._exit(0)
        """
    ).format(as_nobody=as_nobody, body=textwrap.indent(textwrap.dedent(statements).strip(), "    "))

    def limit_file_size() -> None:  # pragma: no cover (runs in the child before exec)
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=limit_file_size,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the child process hung")
    assert done.returncode == 0, f"the child process failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def test_rocksdb_read_only_directory_names_the_path(rocksdb_storage) -> None:
    # Not under pytest's tmp_path: user nobody must be able to reach the directory, only not write it.
    root = Path(tempfile.mkdtemp(prefix="dynamicemb-readonly-"))
    path = root / "db"
    try:
        root.chmod(0o755)
        _filled(rocksdb_storage, path)
        for item in [path, *path.iterdir()]:
            item.chmod(item.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

        opening = f"RocksDBStorage(Path({str(path)!r}), 4)\nresult = 'opened'"
        message = _in_child(opening, as_nobody=os.geteuid() == 0)  # root writes anywhere
        assert re.search(rf"StorageError: RocksDB at {_names(path)}: cannot open: it cannot be written", message), (
            message
        )
        with rocksdb_storage(path, 4, read_only=True) as reader:  # a read-only open still reads
            assert reader.size() == 1000
            with pytest.raises(StorageError, match=rf"{_names(path)}: cannot write: it cannot be written"):
                reader.insert(torch.tensor([5]), torch.ones(1, 4), torch.tensor([1]))
    finally:
        for item in [path, *path.iterdir()] if path.exists() else []:
            item.chmod(0o755)
        shutil.rmtree(root)


def test_rocksdb_full_disk_names_the_path(rocksdb_storage, tmp_path) -> None:
    path = tmp_path / "db"

    writing = f"""
        storage = RocksDBStorage(Path({str(path)!r}), 64, sync_writes=True)
        storage.insert(torch.arange(4000), torch.randn(4000, 64), torch.zeros(4000, dtype=torch.int64))
        result = "written"
    """
    message = _in_child(writing, file_size_limit=256 << 10)  # 256 KiB per file, 1 MiB of rows
    assert re.search(rf"StorageError: RocksDB at {_names(path)}: cannot write: the disk is full", message), message


def test_rocksdb_corrupted_files_name_the_path(rocksdb_storage, tmp_path) -> None:
    path = tmp_path / "db"
    _filled(rocksdb_storage, path)
    (path / "CURRENT").write_bytes(b"\x00garbage")
    with pytest.raises(StorageError, match=rf"RocksDB at {_names(path)}: cannot open: the database is corrupted"):
        rocksdb_storage(path, 4)

    other = tmp_path / "db2"
    _filled(rocksdb_storage, other, rows=20000)
    table_file = max(other.glob("*.sst"), key=lambda p: p.stat().st_size)
    data = bytearray(table_file.read_bytes())
    data[100:4000] = bytes(3900)  # zero a stretch of data blocks
    table_file.write_bytes(bytes(data))
    corrupt = rf"RocksDB at {_names(other)}: .*the database is corrupted"
    with pytest.raises(StorageError, match=corrupt), rocksdb_storage(other, 4) as storage:
        storage.find(torch.arange(20000))


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np, rocksdict
    db = rocksdict.Rdict(sys.argv[1], rocksdict.Options(raw_mode=True))
    rows = 500
    for batch in range(100000):
        keys = (np.arange(rows, dtype=np.int64) + batch * rows).view(np.uint64) ^ np.uint64(1 << 63)
        value = np.zeros(1, dtype=np.int64).tobytes() + np.full(4, batch, dtype=np.float32).tobytes()
        write = rocksdict.WriteBatch(raw_mode=True)
        for key in keys.astype(">u8").view("V8").tolist():
            write.put(key, value)
        db.write(write)
        db.flush(True)
        db.flush_wal(True)
        print(batch, flush=True)
    """
)


def test_rocksdb_killed_while_flushing_reopens_consistent(rocksdb_storage, tmp_path) -> None:
    """A process writing atomic batches of 500 rows (our row format, through rocksdict) and flushing
    after each is killed; reopened, the store holds every batch flushed before the kill and, after
    those, only whole batches, in order."""
    path = tmp_path / "db"
    rocksdb_storage(path, 4).close()  # the directory, with its metadata
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    durable = -1
    while durable < 20:
        line = writer.stdout.readline()
        assert line, f"the writer stopped early (exit code {writer.poll()})"
        durable = int(line)
    writer.send_signal(signal.SIGKILL)  # most likely inside a flush: the loop is mostly flushes
    writer.wait()
    with rocksdb_storage(path, 4) as storage:
        keys, values = [], []
        for batch_keys, batch_values, _ in storage.dump():
            keys.append(batch_keys)
            values.append(batch_values)
    keys, values = torch.cat(keys), torch.cat(values)
    batches = values[:, 0].long()
    assert torch.equal(values, values[:, :1].expand(-1, 4))  # no torn row
    assert torch.equal(batches, keys // 500)  # every row where its batch put it
    count = int(batches.max()) + 1
    assert count > durable  # every flushed batch is there
    assert torch.equal(torch.bincount(batches), torch.full((count,), 500))  # whole batches, none missing


@pytest.mark.parametrize(
    ("module", "make"),
    [
        ("rocksdict", lambda tmp_path: __import__("dynamicemb").RocksDBStorage(tmp_path / "db", 4)),
        ("redis", lambda tmp_path: __import__("dynamicemb").RedisStorage(4)),
    ],
)
def test_a_missing_extra_says_how_to_install_it(module: str, make, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    extra = {"rocksdict": "rocksdb", "redis": "redis"}[module]
    with pytest.raises(ImportError, match=re.escape(f"pip install 'dynamicemb[{extra}]'")):
        make(tmp_path)
