"""The input and output distribution of row-wise sharded dynamic tables (torch ops only).

Each rank holds one shard of every dynamic table; a key belongs to the rank its table's
:class:`~dynamicemb.planner.KeyDistribution` names. For a batch, every rank

1. takes the ids of each table (``[N_t]``), deduplicates them if ``use_index_dedup``
   (``torch.unique``, keeping the inverse ``[N_t]``), and sorts the keys it sends by owner;
2. all-gathers the ``[world_size, num_tables]`` counts of keys it sends to each owner (so every
   rank knows what it will receive and which tables the global batch touches);
3. all-to-alls the keys (``all_to_all_single``): per destination, table by table;
4. looks the received keys up in its shards (:meth:`ShardRouter.lookup`);
5. all-to-alls the embeddings back, flattened (per destination, table by table, ``count * dim``
   elements each) with a differentiable all-to-all whose backward sends the gradients to the
   owners (divided by the world size under TorchRec's gradient division, as TorchRec's own
   embedding all-to-alls do), where the fused optimizer applies them; a shard that got no key of
   a table the global batch uses still advances that table's optimizer step, so every shard
   counts steps as the unsharded table does;
6. puts the embeddings back in the order of the ids (undoing the owner sort and the dedup).

Tables with an admission strategy are never deduplicated before the all-to-all: their owner counts
every occurrence of a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torchrec.distributed.types import Awaitable
from torchrec.streamable import Multistreamable

from dynamicemb.distributed.comm import AllToAllAwaitable, all_to_all_with_grad
from dynamicemb.distributed.key_distribution import owner_ranks
from dynamicemb.distributed.parameter_sharding import KeyDistribution
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.lookup import dynamic_embedding_lookup

__all__ = ["RoutedKeys", "ShardRouter", "TableRequest"]


@dataclass
class TableRequest:
    """How to put one table's answers back in the order of its ids on the requesting rank.

    positions: ``[N]`` for each id, the position of its key among the keys this rank sent,
    which are ordered by owner (undoing both the owner sort and the dedup in one gather).
    """

    positions: torch.Tensor


@dataclass
class RoutedKeys(Multistreamable):
    """The keys a rank owns after the input all-to-all, and what is needed to answer them.

    keys: per table, ``[R_t]`` int64 keys received, grouped by source rank in rank order.
    recv_counts: ``[source][table]`` keys received.
    send_counts: ``[owner][table]`` keys this rank sent.
    requests: per table, this rank's :class:`TableRequest`.
    active: per table, whether any rank has ids of it in this batch.
    """

    keys: list[torch.Tensor]
    recv_counts: list[list[int]]
    send_counts: list[list[int]]
    requests: list[TableRequest]
    active: list[bool]

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in self.keys:
            tensor.record_stream(stream)  # type: ignore[arg-type]
        for request in self.requests:
            request.positions.record_stream(stream)  # type: ignore[arg-type]


class _StepOnEmptyBatch(torch.autograd.Function):
    """A training lookup of no keys on a shard whose table the global batch touches: the shard's
    optimizer step still advances in the backward, as it does on the shards that got keys."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, table: DynamicEmbeddingTable) -> torch.Tensor:
        keys = torch.zeros(0, dtype=torch.int64, device=table.device)
        embeddings, handle = table.lookup(keys, torch.zeros_like(keys), training=True)
        ctx.table, ctx.handle = table, handle
        return embeddings

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        table: DynamicEmbeddingTable = ctx.table
        table.apply_gradients(ctx.handle, torch.zeros((0, table.dim), dtype=torch.float32, device=table.device))
        return None, None


class _KeysAwaitable(Awaitable[RoutedKeys]):
    def __init__(self, keys: AllToAllAwaitable, routed: RoutedKeys) -> None:
        super().__init__()
        self._keys = keys
        self._routed = routed

    def _wait_impl(self) -> RoutedKeys:
        received = self._keys.wait()
        routed = self._routed
        num_tables = len(routed.requests)
        pieces: list[list[torch.Tensor]] = [[] for _ in range(num_tables)]
        start = 0
        for counts in routed.recv_counts:
            for t, count in enumerate(counts):
                pieces[t].append(received[start : start + count])
                start += count
        routed.keys = [torch.cat(p) for p in pieces]
        return routed


class _CountsAwaitable(Awaitable[Awaitable[RoutedKeys]]):
    def __init__(
        self,
        router: ShardRouter,
        send_keys: torch.Tensor,
        send_counts: torch.Tensor,
        requests: list[TableRequest],
    ) -> None:
        super().__init__()
        self._router = router
        self._send_keys = send_keys
        self._requests = requests
        self._gathered = [torch.empty_like(send_counts) for _ in range(router.world_size)]
        self._work = dist.all_gather(self._gathered, send_counts, group=router.group, async_op=True)

    def _wait_impl(self) -> Awaitable[RoutedKeys]:
        if self._work is not None:
            self._work.wait()
        counts = torch.stack(self._gathered).cpu()  # [source, owner, table]
        rank = self._router.rank
        send_counts = counts[rank].tolist()
        recv_counts = counts[:, rank].tolist()
        active = (counts.sum(dim=(0, 1)) > 0).tolist()
        keys = AllToAllAwaitable(
            self._send_keys,
            [sum(c) for c in recv_counts],
            [sum(c) for c in send_counts],
            self._router.group,
        )
        routed = RoutedKeys([], recv_counts, send_counts, self._requests, active)
        return _KeysAwaitable(keys, routed)


class ShardRouter:
    """Sends each table's ids to the shards that own them and brings their embeddings back.

    tables: this rank's shard of each table (``dim`` columns each), in a fixed order shared by
    every rank; distributions: each table's key rule; ``output_dtype``: the dtype of the returned
    embeddings; ``wire_dtypes``: (forward, backward) dtypes of the embedding all-to-all
    (``None``: ``output_dtype``).
    """

    def __init__(
        self,
        tables: Sequence[DynamicEmbeddingTable],
        distributions: Sequence[KeyDistribution],
        group: dist.ProcessGroup,
        *,
        use_index_dedup: bool,
        output_dtype: torch.dtype = torch.float32,
        wire_dtypes: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
    ) -> None:
        self.tables = list(tables)
        self.distributions = list(distributions)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.dedup = [use_index_dedup and not table.needs_counts for table in self.tables]
        self.output_dtype = output_dtype
        self.wire_dtypes = wire_dtypes

    # --- input distribution ----------------------------------------------------------------------
    def route(self, ids: Sequence[torch.Tensor]) -> Awaitable[Awaitable[RoutedKeys]]:
        """``ids``: per table, ``[N_t]`` int64 on the tables' device. The first wait exchanges the
        counts, the second the keys."""
        if len(ids) != len(self.tables):
            raise ValueError(f"route needs the ids of {len(self.tables)} tables, got {len(ids)}")
        world_size = self.world_size
        requests: list[TableRequest] = []
        sorted_keys: list[torch.Tensor] = []
        owner_counts: list[torch.Tensor] = []
        for table_ids, distribution, dedup in zip(ids, self.distributions, self.dedup):
            inverse = None
            send = table_ids
            if dedup:
                send, inverse = torch.unique(table_ids, return_inverse=True)
            owners = owner_ranks(send, world_size, distribution)
            order = torch.argsort(owners, stable=True)
            restore = torch.empty_like(order)
            restore[order] = torch.arange(order.numel(), device=order.device)
            requests.append(TableRequest(positions=restore if inverse is None else restore[inverse]))
            sorted_keys.append(send[order])
            owner_counts.append(torch.bincount(owners, minlength=world_size))
        counts = torch.stack(owner_counts, dim=1) if owner_counts else torch.zeros(world_size, 0, dtype=torch.int64)
        host_counts = counts.tolist()
        offsets = [0] * len(sorted_keys)
        chunks: list[torch.Tensor] = []
        for owner in range(world_size):
            for t, keys in enumerate(sorted_keys):
                n = host_counts[owner][t]
                chunks.append(keys[offsets[t] : offsets[t] + n])
                offsets[t] += n
        device = self.tables[0].device if self.tables else torch.device("cpu")
        send_keys = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64, device=device)
        return _CountsAwaitable(self, send_keys, counts.to(device), requests)

    # --- lookups on this rank's shards ---------------------------------------------------------------
    def lookup(self, routed: RoutedKeys, *, training: bool) -> list[torch.Tensor]:
        """Per table, ``[R_t, dim_t]`` embeddings of the received keys (training inserts new keys
        and, with autograd on, applies the fused optimizer in the backward)."""
        out = []
        for table, keys, active in zip(self.tables, routed.keys, routed.active):
            if keys.numel() == 0 and training and active and torch.is_grad_enabled():
                anchor = torch.empty(0, device=table.device, requires_grad=True)
                out.append(_StepOnEmptyBatch.apply(anchor, table))
            else:
                out.append(dynamic_embedding_lookup(table, keys, training=training))
        return out

    # --- output distribution ---------------------------------------------------------------------------
    def answer(self, routed: RoutedKeys, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send each table's ``[R_t, dim_t]`` embeddings back to the ranks that asked; returns, per
        table, ``[N_t, dim_t]`` (``output_dtype``) in the order of this rank's ids."""
        dims = [table.dim for table in self.tables]
        chunks: list[torch.Tensor] = []
        input_splits: list[int] = []
        starts = [0] * len(dims)
        for counts in routed.recv_counts:
            size = 0
            for t, count in enumerate(counts):
                rows = embeddings[t][starts[t] : starts[t] + count]
                chunks.append(rows.reshape(-1).to(self.output_dtype))
                starts[t] += count
                size += count * dims[t]
            input_splits.append(size)
        output_splits = [sum(c * d for c, d in zip(counts, dims)) for counts in routed.send_counts]
        forward_dtype, backward_dtype = self.wire_dtypes
        received = all_to_all_with_grad(
            torch.cat(chunks), output_splits, input_splits, self.group, forward_dtype, backward_dtype
        )
        per_table: list[list[torch.Tensor]] = [[] for _ in dims]
        start = 0
        for counts in routed.send_counts:
            for t, count in enumerate(counts):
                size = count * dims[t]
                per_table[t].append(received[start : start + size].view(count, dims[t]))
                start += size
        return [torch.cat(rows).index_select(0, request.positions) for rows, request in zip(per_table, routed.requests)]
