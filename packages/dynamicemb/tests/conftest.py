"""Fixtures for the storage tests: a local redis-server and fresh storages of every kind."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from dynamicemb.storage import PyDictStorage, Storage
from dynamicemb.storage.redis_server import LocalRedisServer, find_redis_server

NewStorage = Callable[..., Storage]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedisServer]:
    """One redis-server for the session, on a free loopback port (tests use distinct key prefixes)."""
    if find_redis_server() is None:
        pytest.skip("redis-server not found on PATH or in /usr/bin, /usr/sbin (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="the redis client is the optional extra dynamicemb[redis]")
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def new_storage(request: pytest.FixtureRequest, tmp_path) -> Iterator[NewStorage]:
    """``new_storage(kind, value_dim, dtype=torch.float32, **kwargs)``: an empty storage of ``kind``
    (``"dict"``, ``"rocksdb"`` in a fresh directory, ``"rocksdb-write-behind"`` (the same behind a
    WriteBehindStorage), ``"redis"`` under a fresh prefix); closed after the test."""
    opened: list[Storage] = []
    servers: list[LocalRedisServer] = []

    def make(kind: str, value_dim: int, dtype: torch.dtype = torch.float32, **kwargs) -> Storage:
        if kind == "dict":
            storage: Storage = PyDictStorage(value_dim, dtype)
        elif kind == "rocksdb":
            pytest.importorskip("rocksdict", reason="rocksdict is the optional extra dynamicemb[rocksdb]")
            from dynamicemb.storage import RocksDBStorage

            storage = RocksDBStorage(tmp_path / f"rocksdb-{uuid.uuid4().hex[:8]}", value_dim, dtype, **kwargs)
        elif kind == "rocksdb-write-behind":
            from dynamicemb.storage import WriteBehindStorage

            storage = WriteBehindStorage(make("rocksdb", value_dim, dtype, **kwargs), max_pending_rows=1 << 16)
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            servers.append(server)
            from dynamicemb.storage import RedisStorage

            storage = RedisStorage(value_dim, dtype, port=server.port, prefix=f"test-{uuid.uuid4().hex}", **kwargs)
        else:
            raise ValueError(f"unknown storage kind {kind!r}")
        opened.append(storage)
        return storage

    yield make
    for storage in reversed(opened):  # wrappers before the stores they wrap
        if hasattr(storage, "close"):
            storage.close()
    if servers:
        import redis

        redis.Redis(port=servers[0].port).flushdb()  # no rows outlive their test
