"""Sequence-length load balancing: split a global batch across data-parallel ranks by attention cost.

A sample of ``n`` tokens costs ``n**2 + a * n`` (:func:`sequence_cost`): the quadratic term is the
attention over the jagged sequence, the linear term the per-token layers (``a`` is the ratio of one
token's linear-layer work to one attention pair's; for an HSTU layer of hidden size ``d`` roughly
``2.5 * d``). :func:`partition_by_cost` splits the samples into ``k`` parts of nearly equal total
cost with the Karmarkar-Karp largest differencing method for ``k`` parts, then improves the result by
moves and swaps out of the heaviest part, and never returns a split whose heaviest part costs more
than the contiguous split's. Every step is deterministic (ties are broken by sample index), so every
rank that sees the same lengths computes the same partition without communicating.

With ``equal_size=True`` every part gets ``len // k`` or ``len // k + 1`` samples (for models or
collectives that need the same batch size on every rank): the differencing then combines groups of
``k`` samples of neighbouring cost, so each part takes exactly one sample of each group, and the
refinement only swaps.

:class:`BalancedBatchSampler` applies this to a `DataLoader`: it draws global batches of indices from
a seeded order, reads their lengths, and yields this rank's part.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

__all__ = [
    "BalancedBatchSampler",
    "contiguous_partition",
    "imbalance",
    "karmarkar_karp",
    "partition_by_cost",
    "partition_costs",
    "sequence_cost",
]

LengthSource = Sequence[int] | np.ndarray | Callable[[np.ndarray], Sequence[int] | np.ndarray]


def sequence_cost(lengths: Sequence[int] | np.ndarray, linear_coefficient: float = 0.0) -> np.ndarray:
    """float64 ``[N]`` cost ``len**2 + linear_coefficient * len`` of each sample (lengths ``[N]``, >= 0)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got min {lengths.min():g}")
    if linear_coefficient < 0:
        raise ValueError(f"linear_coefficient must be >= 0, got {linear_coefficient}")
    return lengths * lengths + linear_coefficient * lengths


def partition_costs(costs: Sequence[float] | np.ndarray, parts: Sequence[Sequence[int]]) -> np.ndarray:
    """float64 ``[k]`` total cost of each part (``parts``: sample indices per part)."""
    costs = np.asarray(costs, dtype=np.float64)
    return np.array([costs[list(p)].sum() for p in parts], dtype=np.float64)


def imbalance(costs: Sequence[float] | np.ndarray, parts: Sequence[Sequence[int]]) -> float:
    """max / mean of the parts' total costs (1.0 = perfectly even; the step waits for the heaviest rank)."""
    totals = partition_costs(costs, parts)
    mean = totals.mean()
    return float(totals.max() / mean) if mean > 0 else 1.0


def contiguous_partition(num_samples: int, num_parts: int) -> list[list[int]]:
    """The unbalanced split: consecutive runs of ``num_samples // num_parts`` or one more samples."""
    _check_sizes(num_samples, num_parts)
    return [chunk.tolist() for chunk in np.array_split(np.arange(num_samples), num_parts)]


def _check_sizes(num_samples: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_samples < num_parts:
        raise ValueError(f"cannot give each of {num_parts} parts a sample: only {num_samples} samples")


class _Subsets:
    """Subsets as nodes of a merge forest: a leaf is one sample, an inner node the union of two nodes."""

    def __init__(self) -> None:
        self.children: list[tuple[int, int]] = []
        self.leaf_index: list[int] = []

    def leaf(self, index: int) -> int:
        self.children.append((-1, -1))
        self.leaf_index.append(index)
        return len(self.children) - 1

    def union(self, a: int, b: int) -> int:
        self.children.append((a, b))
        self.leaf_index.append(-1)
        return len(self.children) - 1

    def members(self, node: int) -> list[int]:
        found, stack = [], [node]
        while stack:
            current = stack.pop()
            if current < 0:
                continue
            if self.leaf_index[current] >= 0:
                found.append(self.leaf_index[current])
            else:
                stack.extend(self.children[current])
        return found


# One subset of a k-tuple: (total cost, number of samples, minus its smallest sample index, node).
# Sorting these tuples in descending order is the deterministic order of the differencing (ties:
# fewer samples, then the larger smallest index, count as lighter). A k-tuple is stored as its
# non-empty subsets only, heaviest first; the empty ones are implied (lighter than any other).
_Entry = tuple[float, int, int, int]


def _combine(a: list[_Entry], b: list[_Entry], k: int, subsets: _Subsets) -> list[_Entry]:
    """Pair the heaviest subset of ``a`` with the lightest of ``b`` (and so on), heaviest first.

    Subset ``i`` of ``a`` meets subset ``k - 1 - i`` of ``b``, which is empty unless ``k - 1 - i`` is
    below ``len(b)``: only the last ``len(b)`` positions of ``a`` change (O(len(a) + len(b)), not O(k)).
    """
    merged = a[: k - len(b)]
    for j, right in enumerate(b):
        i = k - 1 - j
        if i >= len(a):
            merged.append(right)
            continue
        left = a[i]
        node = subsets.union(left[3], right[3])
        merged.append((left[0] + right[0], left[1] + right[1], max(left[2], right[2]), node))
    merged.sort(reverse=True)
    return merged


def _spread(entries: list[_Entry], k: int) -> float:
    return entries[0][0] - (entries[-1][0] if len(entries) == k else 0.0)


def karmarkar_karp(costs: Sequence[float] | np.ndarray, num_parts: int, *, equal_size: bool = False) -> list[list[int]]:
    """Largest differencing method (Karmarkar-Karp) for ``num_parts`` parts.

    Each sample starts as a ``num_parts``-tuple of subsets (itself and empty ones); the two tuples of
    largest spread (heaviest minus lightest subset) are combined, heaviest subset with lightest, until
    one tuple is left. With ``equal_size`` the samples, sorted by cost, start in groups of
    ``num_parts`` (the last group padded with empty subsets), so every part gets one sample per group.
    Time: at most O(N k log k), in pure Python (a global batch of 8192 samples over 64 parts: ~0.15 s).

    Args:
        costs: ``[N]`` non-negative cost per sample, ``N >= num_parts``.
        num_parts: ``k``.
        equal_size: parts of ``N // k`` or ``N // k + 1`` samples.

    Returns:
        ``k`` lists of sample indices (each ascending), every index exactly once, each part non-empty,
        parts ordered by their smallest index.
    """
    costs = np.asarray(costs, dtype=np.float64)
    _check_sizes(len(costs), num_parts)
    # heaviest first; equal costs in index order
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    subsets = _Subsets()
    tuples: list[list[_Entry]] = []
    group = 1 if not equal_size else num_parts
    for start in range(0, len(order), group):
        members = [(float(costs[i]), 1, -i, subsets.leaf(i)) for i in order[start : start + group]]
        tuples.append(members)
    heap = [(-_spread(t, num_parts), serial, t) for serial, t in enumerate(tuples)]
    heapq.heapify(heap)
    serial = len(heap)
    while len(heap) > 1:
        _, _, first = heapq.heappop(heap)
        _, _, second = heapq.heappop(heap)
        merged = _combine(first, second, num_parts, subsets)
        heapq.heappush(heap, (-_spread(merged, num_parts), serial, merged))
        serial += 1
    parts = [sorted(subsets.members(entry[3])) for entry in heap[0][2]]
    return sorted(parts, key=lambda p: p[0])


def _best_exchange(
    heavy: np.ndarray, light: np.ndarray, gap: float, allow_moves: bool
) -> tuple[float, int, int] | None:
    """The move (``light`` index -1) or swap whose cost transfer ``d`` lies in ``(0, gap)`` closest to
    ``gap / 2``: (distance, heavy position, light position or -1), or None."""
    best: tuple[float, int, int] | None = None
    if allow_moves and len(heavy) > 1:
        distance = np.where((heavy > 0) & (heavy < gap), np.abs(heavy - gap / 2), np.inf)
        i = int(np.argmin(distance))
        if np.isfinite(distance[i]):
            best = (float(distance[i]), i, -1)
    delta = heavy[:, None] - light[None, :]
    distance = np.where((delta > 0) & (delta < gap), np.abs(delta - gap / 2), np.inf)
    flat = int(np.argmin(distance))
    if np.isfinite(distance.flat[flat]) and (best is None or distance.flat[flat] < best[0]):
        i, j = divmod(flat, delta.shape[1])
        best = (float(distance.flat[flat]), i, j)
    return best


def _refine(costs: np.ndarray, parts: list[list[int]], equal_size: bool, max_rounds: int) -> list[list[int]]:
    """Move or swap samples out of the heaviest part while that lowers it (each step lowers the sum of
    squared part costs, so this ends); with ``equal_size`` only swaps."""
    parts = [list(p) for p in parts]
    totals = partition_costs(costs, parts)
    for _ in range(max_rounds):
        h = int(np.argmax(totals))
        heavy = costs[parts[h]]
        improved = False
        for r in sorted(range(len(parts)), key=lambda p: (totals[p], p)):
            gap = totals[h] - totals[r]
            if r == h or gap <= 0:
                continue
            found = _best_exchange(heavy, costs[parts[r]], gap, allow_moves=not equal_size)
            if found is None:
                continue
            _, i, j = found
            moved = parts[h].pop(i)
            if j >= 0:
                parts[h].append(parts[r].pop(j))
            parts[r].append(moved)
            totals[h], totals[r] = costs[parts[h]].sum(), costs[parts[r]].sum()
            improved = True
            break
        if not improved:
            break
    return sorted((sorted(p) for p in parts), key=lambda p: p[0])


def partition_by_cost(
    costs: Sequence[float] | np.ndarray,
    num_parts: int,
    *,
    equal_size: bool = False,
    refine_rounds: int | None = None,
) -> list[list[int]]:
    """Split samples into ``num_parts`` parts of nearly equal total cost (deterministic).

    Karmarkar-Karp (:func:`karmarkar_karp`), then at most ``refine_rounds`` (default ``4 * N``)
    improving moves/swaps out of the heaviest part; if the heaviest part still costs more than the
    contiguous split's heaviest part, the contiguous split is returned (it never is worse).

    Args:
        costs: ``[N]`` non-negative cost per sample (e.g. :func:`sequence_cost`), ``N >= num_parts``.
        num_parts: number of data-parallel ranks ``k``.
        equal_size: every part gets ``N // k`` or ``N // k + 1`` samples.
        refine_rounds: bound on improvement steps (0 = plain Karmarkar-Karp).

    Returns:
        ``k`` non-empty lists of sample indices, each ascending, every index in exactly one list; part
        ``r`` is data-parallel rank ``r``'s share.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 1:
        raise ValueError(f"costs must be 1-D, got shape {costs.shape}")
    if costs.size and (not np.all(np.isfinite(costs)) or costs.min() < 0):
        raise ValueError("costs must be finite and >= 0")
    parts = karmarkar_karp(costs, num_parts, equal_size=equal_size)
    rounds = 4 * len(costs) if refine_rounds is None else refine_rounds
    if rounds > 0 and num_parts > 1:
        parts = _refine(costs, parts, equal_size, rounds)
    contiguous = contiguous_partition(len(costs), num_parts)
    if partition_costs(costs, parts).max() > partition_costs(costs, contiguous).max():
        return contiguous
    return parts


class BalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one data-parallel rank, cut from global batches balanced by sequence cost.

    Every epoch the ``num_samples`` indices are ordered by ``(seed, epoch)`` (or kept in order), cut
    into global batches of ``global_batch_size``, and each global batch is split across the
    ``world_size`` ranks by :func:`partition_by_cost` on the costs of its samples' lengths. Every rank
    computes the same split from the same lengths, so no communication is needed; this rank yields
    its part (indices in the epoch order's relative order of the global batch: ascending positions).

    Use it as ``DataLoader(dataset, batch_sampler=sampler, ...)``. A rank's batch size varies from
    step to step (unless ``equal_size``): a loss averaged per rank and then averaged over ranks (as
    DDP does) weighs samples unevenly, so sum the per-rank loss and divide by the global batch's
    sample (or token) count times ``1 / world_size`` to keep the gradient of the whole global batch.

    Args:
        num_samples: size of the dataset.
        lengths: the sequence length of each sample: a ``[num_samples]`` array, or a callable taking an
            int64 array of indices and returning their lengths (called once per global batch).
        global_batch_size: samples per global batch (all ranks together), ``>= world_size``.
        rank, world_size: this process's data-parallel rank and the data-parallel size.
        linear_coefficient: ``a`` of the cost ``len**2 + a * len``.
        equal_size: every rank gets the same number of samples (+-1 on a short last batch).
        shuffle, seed: per-epoch order (call :meth:`set_epoch` each epoch; it can also skip the epoch's
            first global batches, to resume mid-epoch).
        drop_last: drop the last global batch if it is short; else it is split too, padded with the
            epoch's first indices up to ``world_size`` samples if it has fewer.
    """

    def __init__(
        self,
        num_samples: int,
        lengths: LengthSource,
        global_batch_size: int,
        *,
        rank: int,
        world_size: int,
        linear_coefficient: float = 0.0,
        equal_size: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if global_batch_size < world_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be >= world_size ({world_size}): "
                "every rank needs a sample"
            )
        if not callable(lengths) and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries but num_samples is {num_samples}")
        self.num_samples = num_samples
        self.lengths = lengths
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.linear_coefficient = linear_coefficient
        self.equal_size = equal_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the order of the next iteration (as with `DistributedSampler`) and how many of its
        first global batches to leave out (a run resumed after ``skip_batches`` steps of the epoch)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _epoch_batches(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    def __len__(self) -> int:
        """Global batches (this rank's batches) left in the epoch."""
        return max(0, self._epoch_batches() - self.skip_batches)

    def _lengths_of(self, indices: np.ndarray) -> np.ndarray:
        found = self.lengths(indices) if callable(self.lengths) else np.asarray(self.lengths)[indices]
        found = np.asarray(found)
        if found.shape != indices.shape:
            raise ValueError(f"lengths gave shape {found.shape} for {indices.shape[0]} indices")
        return found

    def global_batches(self) -> Iterator[np.ndarray]:
        """The epoch's global batches of indices ``[<= global_batch_size]`` (identical on every rank),
        from the ``skip_batches``-th on."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        for batch_index in range(self.skip_batches, self._epoch_batches()):
            batch = order[batch_index * self.global_batch_size : (batch_index + 1) * self.global_batch_size]
            if len(batch) < self.world_size:
                batch = np.concatenate([batch, np.resize(order, self.world_size - len(batch))])
            yield batch

    def split(self, batch: np.ndarray) -> list[list[int]]:
        """Every rank's dataset indices for one global batch ``[N]`` (part ``r`` is rank ``r``'s)."""
        costs = sequence_cost(self._lengths_of(batch), self.linear_coefficient)
        parts = partition_by_cost(costs, self.world_size, equal_size=self.equal_size)
        return [batch[p].tolist() for p in parts]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield self.split(batch)[self.rank]
