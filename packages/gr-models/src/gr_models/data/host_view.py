"""What a model needs to know about a batch on the host, read from the batch's host copy.

A batch built by the data pipeline lives on the host; `Batch.to(device)` moves it and keeps a reference to the host
tensors it came from (`HostCopy`). Sizes a model needs as Python ints (token totals, the longest sequence, the
contextual prefix) and the checks of its inputs (candidate counts, aligned features, static id ranges) are then
computed from those host tensors instead of being read back from the device, which would make the host wait for
every kernel queued before the read. A `HostCopy` refuses tensors that are not on the CPU, so the functions that read
one (`host_lengths`, `host_sequence_counts`, `host_id_range`) never synchronize a device; `sequence_counts` reads
tensors of any device in one read (one synchronization on a device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["HostCopy", "SequenceCounts", "host_id_range", "host_lengths", "host_sequence_counts", "sequence_counts"]


@dataclass(frozen=True)
class HostCopy:
    """A batch's features and candidate counts on the host.

    Attributes:
        features: the KJT with CPU tensors (values and `[K * B]` lengths), the same data as the batch's features.
        num_candidates: `[B]` CPU candidate counts, or None (no candidates).
        describes: the features (on any device) this copy holds the data of; a batch whose features are another
            object (replaced after the move) has no valid host copy.
    """

    features: KeyedJaggedTensor
    num_candidates: Tensor | None
    describes: KeyedJaggedTensor

    def __post_init__(self) -> None:
        tensors = [self.features.lengths(), self.features.values()]
        tensors += [self.num_candidates] if self.num_candidates is not None else []
        off_host = [str(t.device) for t in tensors if t.device.type != "cpu"]
        if off_host:
            raise ValueError(f"HostCopy holds host tensors only; got tensors on {off_host}")


@dataclass(frozen=True)
class SequenceCounts:
    """Sizes of one batch's token sequences `[ctx.., item_0, (action_0), .., cand..]` (see
    `gr_models.modules.preprocessing`), as Python ints.

    Attributes:
        total_items: items of every user (history and candidates), `sum n_b`.
        total_history: history events, `sum (n_b - k_b)`.
        total_candidates: candidates, `sum k_b`.
        contextual_totals: per contextual feature, its ids over every user.
        total_tokens: tokens of every sequence.
        max_len: the longest sequence (0 for an empty batch).
        contextual_len: the contextual prefix length when every user has the same one, else 0.
    """

    total_items: int
    total_history: int
    total_candidates: int
    contextual_totals: tuple[int, ...]
    total_tokens: int
    max_len: int
    contextual_len: int


def sequence_counts(
    item_lengths: Tensor, num_candidates: Tensor, contextual_lengths: Sequence[Tensor], with_actions: bool
) -> SequenceCounts:
    """The `SequenceCounts` of `[B]` item lengths, candidate counts and contextual lengths (any device: one read).

    Raises ValueError when a user has more candidates than items.
    """
    item_lengths = item_lengths.to(torch.int64)
    num_candidates = num_candidates.to(device=item_lengths.device, dtype=torch.int64)
    history = item_lengths - num_candidates
    contextual = [c.to(device=item_lengths.device, dtype=torch.int64) for c in contextual_lengths]
    contextual_total = sum(contextual, torch.zeros_like(item_lengths))
    lengths = contextual_total + (2 if with_actions else 1) * history + num_candidates
    zero = item_lengths.new_zeros(())
    empty = item_lengths.numel() == 0
    facts = [
        item_lengths.sum(),
        history.sum(),
        num_candidates.sum(),
        lengths.sum(),
        zero if empty else lengths.max(),
        zero if empty else history.min(),
        zero if empty else contextual_total[0],
        (contextual_total != (zero if empty else contextual_total[0])).any().to(torch.int64),
        *(c.sum() for c in contextual),
    ]
    items, history_total, candidates, tokens, max_len, shortest, first_ctx, uneven, *ctx = torch.stack(facts).tolist()
    if shortest < 0:
        raise ValueError("num_candidates exceeds the item sequence length of some user")
    return SequenceCounts(
        total_items=items,
        total_history=history_total,
        total_candidates=candidates,
        contextual_totals=tuple(ctx),
        total_tokens=tokens,
        max_len=max_len,
        contextual_len=first_ctx if contextual and not uneven else 0,
    )


def host_lengths(copy: HostCopy, name: str) -> Tensor:
    """`[B]` int64 CPU lengths of the feature `name` of the host copy."""
    features = copy.features
    keys = features.keys()
    if name not in keys:
        raise ValueError(f"the batch has no feature {name!r}; its features are {keys}")
    return features.lengths().view(len(keys), features.stride())[keys.index(name)].to(torch.int64)


def host_sequence_counts(
    copy: HostCopy,
    item_feature_name: str,
    contextual_feature_names: Sequence[str],
    aligned_feature_names: Sequence[str],
    with_actions: bool,
) -> SequenceCounts:
    """The `SequenceCounts` of a batch from its host copy, after checking on the host that every feature of
    `aligned_feature_names` (action, side features, timestamps) has the item feature's per-user lengths."""
    items = host_lengths(copy, item_feature_name)
    for name in aligned_feature_names:
        if not torch.equal(host_lengths(copy, name), items):
            raise ValueError(
                f"feature {name!r} must have the same per-user lengths as the item feature {item_feature_name!r}"
            )
    candidates = copy.num_candidates if copy.num_candidates is not None else torch.zeros_like(items)
    contextual = [host_lengths(copy, name) for name in contextual_feature_names]
    return sequence_counts(items, candidates, contextual, with_actions)


def host_id_range(copy: HostCopy, name: str) -> tuple[int, int] | None:
    """(smallest, largest) id of the feature `name` in the host copy, or None when it has no ids."""
    features = copy.features
    keys = features.keys()
    if name not in keys:
        raise ValueError(f"the batch has no feature {name!r}; its features are {keys}")
    start = sum(features.length_per_key()[: keys.index(name)])
    ids = features.values()[start : start + features.length_per_key()[keys.index(name)]]
    if ids.numel() == 0:
        return None
    low, high = torch.aminmax(ids)
    return int(low), int(high)
