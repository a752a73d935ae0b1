"""A :class:`Storage` on a Redis server: the rows of one table under a key prefix (``redis`` client)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dynamicemb.storage.base import Storage
from dynamicemb.storage.resp import resp_command
from dynamicemb.storage.row_codec import RowCodec, StorageError, require

__all__ = ["RedisStorage"]

_FORMAT = 1
_GLOB_SPECIAL = b"*?[]\\"


def _glob_escape(text: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in text)


class RedisStorage(Storage):
    """The rows ``[embedding | optimizer state]`` of one table, with their scores, on the Redis
    server at ``host:port`` under the keys ``<prefix>:r:<8 bytes>`` (one prefix per table; the
    key ``<prefix>:meta`` records ``value_dim`` and ``dtype``, checked when a storage reattaches).

    Reads are ``MGET`` and writes ``MSET`` (atomic) of at most ``batch_rows`` keys each, so the
    client holds at most one batch of encoded rows. A failing command is retried ``retries`` times
    with exponential backoff from ``backoff_s`` (commands are idempotent), each attempt bounded by
    ``timeout_s``; then :class:`StorageError` names the address: a call fails within about
    :attr:`max_wait_s` seconds, never silently. A server that may evict keys under memory pressure
    (``maxmemory`` set with a policy other than ``noeviction``) would drop rows without telling:
    it is refused unless ``allow_evicting_server``. Rows live in the server's memory; whether they
    survive a restart of the server is its own persistence configuration (:meth:`flush` with
    ``save_on_flush`` asks it to write a snapshot); a table's dump holds them in any case.
    """

    def __init__(
        self,
        value_dim: int,
        dtype: torch.dtype = torch.float32,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        prefix: str = "dynamicemb",
        password: str | None = None,
        batch_rows: int = 16384,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        save_on_flush: bool = False,
        allow_evicting_server: bool = False,
    ) -> None:
        if value_dim <= 0 or batch_rows <= 0 or timeout_s <= 0 or retries < 0:
            raise ValueError(
                f"RedisStorage: value_dim, batch_rows and timeout_s must be positive and retries >= 0, got "
                f"{value_dim}, {batch_rows}, {timeout_s}, {retries}"
            )
        if not prefix or ":" in prefix[-1:]:
            raise ValueError(f"RedisStorage: prefix must be a non-empty name not ending in ':', got {prefix!r}")
        redis = require("redis", "redis", "RedisStorage")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.address = f"{host}:{port}/{db}"
        self.prefix = prefix
        self.batch_rows = batch_rows
        self.retries = retries
        self.timeout_s = timeout_s
        self.save_on_flush = save_on_flush
        self._backoffs_s = [min(backoff_s * 2**i, backoff_s * 8) for i in range(retries)]
        # Each attempt may wait for a connection and then for an answer.
        self.max_wait_s = (retries + 1) * 2 * timeout_s + sum(self._backoffs_s)
        self._codec = RowCodec(prefix.encode() + b":r:", value_dim, dtype)
        self._meta_key = prefix.encode() + b":meta"
        self._client = redis.Redis(
            host=host,
            port=port,
            db=db,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # retries are counted here, in _with_retries
        )
        self._check_server(allow_evicting_server)
        self._check_meta()

    # --- connection -----------------------------------------------------------------------------
    def _with_retries(self, doing: str, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, again after a lost connection or a timeout (``retries`` times, with
        backoff); then, or at once for an error the server answered, :class:`StorageError`."""
        failure: Exception | None = None
        for retry in range(self.retries + 1):
            try:
                return attempt()
            except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
                failure = exc
                if retry < self.retries:
                    time.sleep(self._backoffs_s[retry])
            except self._redis.RedisError as exc:
                raise StorageError(f"{self._where()}: cannot {doing}: {type(exc).__name__}: {exc}") from exc
        raise StorageError(
            f"{self._where()}: cannot {doing} (gave up after {self.retries} retries): "
            f"{type(failure).__name__}: {failure}"
        ) from failure

    def _call(self, doing: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(...)`` with retries."""
        return self._with_retries(doing, lambda: getattr(self._client, method)(*args, **kwargs))

    def _batch(self, doing: str, name: bytes, *columns: np.ndarray) -> Any:
        """One command over fixed-width arguments (:func:`resp_command`) with retries."""
        payload = resp_command(name, *columns)

        def attempt() -> Any:
            pool = self._client.connection_pool
            connection = pool.get_connection()
            try:
                connection.send_packed_command([payload])
                return connection.read_response()
            except self._redis.ResponseError:
                raise
            except BaseException:
                connection.disconnect()
                raise
            finally:
                pool.release(connection)

        return self._with_retries(doing, attempt)

    def _check_server(self, allow_evicting_server: bool) -> None:
        self._call("connect", "ping")
        try:
            config = self._client.config_get("maxmemory*")
        except self._redis.RedisError as exc:
            warnings.warn(
                f"Redis at {self.address}: cannot read its maxmemory policy ({exc}); if it evicts keys, "
                "rows are lost without an error",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        policy = config.get(b"maxmemory-policy", config.get("maxmemory-policy", b"noeviction"))
        policy = policy.decode() if isinstance(policy, bytes) else policy
        limit = int(config.get(b"maxmemory", config.get("maxmemory", 0)))
        if limit and policy != "noeviction" and not allow_evicting_server:
            raise StorageError(
                f"Redis at {self.address}: maxmemory {limit} with policy {policy!r} evicts keys when full, "
                "which would drop embedding rows silently; set maxmemory-policy noeviction (writes then fail "
                "with an error when full) or pass allow_evicting_server=True"
            )

    def _check_meta(self) -> None:
        wanted = {"format": _FORMAT, "value_dim": self.value_dim, "dtype": str(self.dtype).removeprefix("torch.")}
        stored = self._call("read metadata", "get", self._meta_key)
        if stored is None:
            self._call("write metadata", "set", self._meta_key, json.dumps(wanted))
            return
        meta = json.loads(stored)
        if meta != wanted:
            raise StorageError(
                f"Redis at {self.address}: prefix {self.prefix!r} holds rows of {meta.get('value_dim')} x "
                f"{meta.get('dtype')} (format {meta.get('format')}), this table needs "
                f"{wanted['value_dim']} x {wanted['dtype']}; use another prefix"
            )

    # --- Storage --------------------------------------------------------------------------------
    @property
    def value_dim(self) -> int:
        return self._codec.value_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._codec.dtype

    def _where(self) -> str:
        return f"Redis at {self.address} (prefix {self.prefix!r})"

    def _get_rows(self, key_matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``MGET`` of the stored keys ``[N, key_bytes]``, by batches: ``(values, scores, found)``."""
        parts = [
            self._codec.decode_rows(self._batch("read", b"MGET", key_matrix[s : s + self.batch_rows]), self._where())
            for s in range(0, key_matrix.shape[0], self.batch_rows)
        ]
        if not parts:
            return self._codec.decode_rows([], "")
        values, scores, found = (torch.cat(p) for p in zip(*parts))
        return values, scores, found

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, _, found = self._get_rows(self._codec.key_matrix(keys))
        return values.to(keys.device), found.to(keys.device)

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, scores, found = self._get_rows(self._codec.key_matrix(keys))
        return scores.to(keys.device), found.to(keys.device)

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Insert or overwrite; ``scores`` ``None`` keeps the scores of stored keys (0 for new ones)."""
        if values.shape != (keys.numel(), self.value_dim):
            raise ValueError(
                f"RedisStorage.insert: values {tuple(values.shape)}, expected {(keys.numel(), self.value_dim)}"
            )
        key_matrix = self._codec.key_matrix(keys)
        if scores is None:
            scores = self._get_rows(key_matrix)[1]
        for start in range(0, key_matrix.shape[0], self.batch_rows):
            end = start + self.batch_rows
            rows = self._codec.row_matrix(values[start:end], scores[start:end])
            self._batch("write", b"MSET", key_matrix[start:end], rows)

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        key_matrix = self._codec.key_matrix(keys)
        found = self._get_rows(key_matrix)[2]
        for start in range(0, key_matrix.shape[0], self.batch_rows):
            self._batch("delete", b"DEL", key_matrix[start : start + self.batch_rows])
        return found.to(keys.device)

    def _stored_keys(self) -> Iterator[list[bytes]]:
        """Every row key under the prefix once, in batches (``SCAN`` may repeat keys; repeats are dropped)."""
        pattern = _glob_escape(self._codec.prefix) + b"?" * 8
        seen: set[bytes] = set()
        cursor = 0
        while True:
            cursor, found = self._call("scan keys", "scan", cursor, match=pattern, count=self.batch_rows)
            fresh = [key for key in found if key not in seen]
            seen.update(fresh)
            if fresh:
                yield fresh
            if cursor == 0:
                return

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every row once (keys written or erased while the dump runs may or may not appear)."""
        pending: list[bytes] = []
        for stored_keys in self._stored_keys():
            pending += stored_keys
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                yield from self._dump_batch(batch, min_score)
        if pending:
            yield from self._dump_batch(pending, min_score)

    def _key_matrix_of(self, stored_keys: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(stored_keys), dtype=np.uint8).reshape(len(stored_keys), self._codec.key_bytes)

    def _dump_batch(self, stored_keys: list[bytes], min_score: int | None) -> Iterator[tuple]:
        values, scores, found = self._get_rows(self._key_matrix_of(stored_keys))
        keep = found if min_score is None else found & (scores >= min_score)
        if bool(keep.any()):
            yield self._codec.decode_keys(stored_keys)[keep], values[keep], scores[keep]

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        self.insert(keys, values, scores)

    def size(self) -> int:
        return sum(len(batch) for batch in self._stored_keys())

    def flush(self) -> None:
        """Every write is acknowledged when its call returns; with ``save_on_flush`` the server
        also writes a snapshot (``SAVE``) of its data to its disk."""
        if self.save_on_flush:
            self._call("save a snapshot", "save")

    def close(self) -> None:
        self._client.close()

    def describe(self) -> dict[str, Any]:
        return {"type": "RedisStorage", "address": self.address, "prefix": self.prefix, "value_dim": self.value_dim}
