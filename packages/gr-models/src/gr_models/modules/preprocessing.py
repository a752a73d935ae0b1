"""HSTU preprocessing: turn per-feature embeddings into one jagged token sequence per user.

Per user b with contextual tokens c_b, history h_b and candidates k_b (the last k_b items), the tokens are

    [ctx_0 .. ctx_{c_b-1}, item_0, action_0, ..., item_{h_b-1}, action_{h_b-1}, cand_0 .. cand_{k_b-1}]

(without an action feature: `[ctx.., item_0, .., item_{h_b-1}, cand..]`). Candidate actions are labels and are
never fed. Per-item side features (features that are neither contextual, item nor action) are added to the item
embedding. With `PositionEncodingConfig.scale_embeddings`, token embeddings are multiplied by sqrt(hidden_size)
first. Position encoding counts events back from the most recent history event (position 1; an item and its
action share the position) and gives every candidate position 0, or with `count_from="start"` counts events from
the oldest (position 0) and numbers candidates after the last event; contextual tokens get no position encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.data.batch import Batch
from gr_models.data.host_view import HostCopy, SequenceCounts, host_sequence_counts, sequence_counts
from gr_models.modules.jagged import lengths_to_offsets, scatter_rows, token_coordinates
from gr_models.modules.position_encoding import PositionTimeEncoder


@dataclass
class HSTUSequence:
    """One jagged token sequence per user, with the indices that postprocessing needs.

    Attributes:
        values: `[L, D]` token embeddings (hidden states after the layers).
        offsets: `[B+1]` int64 sequence offsets into `values`.
        max_len: longest sequence of this batch.
        scaling_seqlen: the attention normalizer (constant across batches: the configured value or the bound
            implied by the batch's `feature_to_max_seqlen`).
        num_candidates: `[B]` int64 candidate tokens at the end of each sequence (the attention's targets).
        contextual_len: contextual prefix length given to the attention mask; 0 when there is none or when users
            have different contextual lengths (their contextual tokens are then ordinary causal prefix tokens).
        timestamps: `[L]` int64 token timestamps, or None when the batch has none (an action token carries its
            item's time, a contextual token the user's latest item time).
        history_lengths: `[B]` history events per user.
        history_item_index: `[sum h]` index into `values` of each history item token, user by user, oldest first.
        history_event_end_index: `[sum h]` index of the last token of each history event (its action token when
            actions are interleaved, else the item token).
        candidate_index: `[sum k]` index of each candidate token.
    """

    values: Tensor
    offsets: Tensor
    max_len: int
    scaling_seqlen: int
    num_candidates: Tensor
    contextual_len: int
    timestamps: Tensor | None
    history_lengths: Tensor
    history_item_index: Tensor
    history_event_end_index: Tensor
    candidate_index: Tensor

    @classmethod
    def for_layers(
        cls,
        lengths: list[int],
        num_candidates: list[int],
        *,
        scaling_seqlen: int | None = None,
        contextual_len: int = 0,
        timestamps: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> HSTUSequence:
        """The sequence layout alone, for calling HSTU layers directly (`layer(x, sequence)` with `x [sum lengths,
        D]`): `lengths` tokens per user, the last `num_candidates` of each are targets; `scaling_seqlen` defaults to
        the longest length. Empty `values` and no history/candidate indices (postprocessing cannot run on it)."""
        if len(num_candidates) != len(lengths):
            raise ValueError(f"num_candidates has {len(num_candidates)} entries for {len(lengths)} sequences")
        bad = [(n, k) for n, k in zip(lengths, num_candidates) if n < 0 or not 0 <= k <= n]
        if bad:
            raise ValueError(f"each length must be >= 0 and hold its candidates (0 <= k <= n); got (n, k) = {bad[:3]}")
        device = torch.device(device)
        sizes = torch.tensor(lengths, dtype=torch.int64, device=device)
        targets = torch.tensor(num_candidates, dtype=torch.int64, device=device)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(
            values=torch.zeros(0, device=device),
            offsets=torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]),
            max_len=max(lengths, default=0),
            scaling_seqlen=max(lengths, default=0) if scaling_seqlen is None else scaling_seqlen,
            num_candidates=targets,
            contextual_len=contextual_len,
            timestamps=timestamps,
            history_lengths=sizes - targets,
            history_item_index=empty,
            history_event_end_index=empty,
            candidate_index=empty,
        )


@dataclass(frozen=True)
class SequenceInputs:
    """What the preprocessor needs from a batch besides its embeddings, built by the caller.

    Attributes:
        item_feature_name: key of the item embeddings (history followed by candidates).
        action_feature_name: key of the action embeddings aligned with the items, or None (no interleave).
        contextual_feature_names: keys of the contextual embeddings, in the order their tokens come first.
        num_candidates: `[B]` int64 candidates at the end of each user's items, or None (no candidates).
        timestamps: per-item int64 Unix seconds with the item feature's per-user lengths (`[N]` values), or None.
        max_sequence_len: longest token sequence the feature bounds allow (the default attention normalizer).
        host: the batch's host copy (`Batch.host_copy()`), or None: with it the sizes of the sequences come from the
            host, without it they are read from the device (one synchronization).
        timestamp_feature_name: key of the timestamps in the batch (checked against the item lengths on the host).
    """

    item_feature_name: str
    action_feature_name: str | None
    contextual_feature_names: tuple[str, ...]
    num_candidates: Tensor | None
    timestamps: JaggedTensor | None
    max_sequence_len: int
    host: HostCopy | None = None
    timestamp_feature_name: str | None = None

    @classmethod
    def from_batch(cls, batch: Batch) -> SequenceInputs:
        """The feature roles, candidate counts, timestamps and length bound of `batch`."""
        bounds = batch.feature_to_max_seqlen
        stride = 2 if batch.action_feature_name is not None else 1
        contextual_bound = sum(bounds[n] for n in batch.contextual_feature_names)
        timestamps = None
        if batch.timestamp_feature_name is not None:
            timestamps = batch.features[batch.timestamp_feature_name]
        return cls(
            item_feature_name=batch.item_feature_name,
            action_feature_name=batch.action_feature_name,
            contextual_feature_names=tuple(batch.contextual_feature_names),
            num_candidates=batch.num_candidates,
            timestamps=timestamps,
            max_sequence_len=max(1, contextual_bound + stride * bounds[batch.item_feature_name]),
            host=batch.host_copy(),
            timestamp_feature_name=batch.timestamp_feature_name,
        )

    def counts(self, embedded_features: list[str]) -> SequenceCounts | None:
        """The batch's `SequenceCounts` from its host copy (None without one), after checking on the host that the
        action, timestamp and side features (`embedded_features` other than the item and contextual ones) have the
        item feature's per-user lengths."""
        if self.host is None:
            return None
        excluded = {self.item_feature_name, *self.contextual_feature_names}
        aligned = [name for name in embedded_features if name not in excluded]
        if self.action_feature_name is not None and self.action_feature_name not in aligned:
            aligned.append(self.action_feature_name)
        if self.timestamp_feature_name is not None:
            aligned.append(self.timestamp_feature_name)
        with_actions = self.action_feature_name is not None
        return host_sequence_counts(
            self.host, self.item_feature_name, self.contextual_feature_names, aligned, with_actions
        )


@dataclass
class _TokenLayout:
    """Where every token of a batch goes in the jagged sequence (index tensors int64, destinations into `[L]`).

    Attributes:
        lengths: `[B]` tokens per user; offsets: `[B+1]`.
        num_candidates / history_lengths / contextual_total: `[B]` per user.
        counts: the sizes as Python ints.
        history_rows / candidate_rows: `[H]` / `[C]` index into the item rows (`[N]`) of the history items and of
            the candidates.
        contextual_index: one `[N_f]` destination per contextual feature.
        history_ids / event: `[H]` user and index within the user's history of each history event.
        history_item_index / history_event_end_index: `[H]` destinations of an event's item and last token.
        candidate_ids / candidate_pos / candidate_index: `[C]` user, index among the user's candidates, destination.
    """

    lengths: Tensor
    offsets: Tensor
    num_candidates: Tensor
    history_lengths: Tensor
    contextual_total: Tensor
    counts: SequenceCounts
    history_rows: Tensor
    candidate_rows: Tensor
    contextual_index: list[Tensor]
    history_ids: Tensor
    event: Tensor
    history_item_index: Tensor
    history_event_end_index: Tensor
    candidate_ids: Tensor
    candidate_pos: Tensor
    candidate_index: Tensor


def _token_layout(
    item_lengths: Tensor,
    num_candidates: Tensor,
    contextual_lengths: list[Tensor],
    with_actions: bool,
    counts: SequenceCounts | None = None,
) -> _TokenLayout:
    """The layout `[ctx.., item_0, (action_0), .., cand..]` per user from `[B]` int64 lengths (module docstring).

    `counts`: the sizes known on the host; None reads them from the lengths (one synchronization on a device).
    """
    if counts is None:
        counts = sequence_counts(item_lengths, num_candidates, contextual_lengths, with_actions)
    history_lengths = item_lengths - num_candidates
    stride = 2 if with_actions else 1
    contextual_total = sum(contextual_lengths, torch.zeros_like(item_lengths))
    lengths = contextual_total + stride * history_lengths + num_candidates
    offsets = lengths_to_offsets(lengths)
    starts = offsets[:-1]
    contextual_index, consumed = [], torch.zeros_like(item_lengths)
    for ctx_lengths, ctx_total in zip(contextual_lengths, counts.contextual_totals):
        ids, pos = token_coordinates(ctx_lengths, ctx_total)
        contextual_index.append(starts[ids] + consumed[ids] + pos)
        consumed = consumed + ctx_lengths
    history_ids, event = token_coordinates(history_lengths, counts.total_history)
    history_item_index = starts[history_ids] + contextual_total[history_ids] + stride * event
    candidate_ids, candidate_pos = token_coordinates(num_candidates, counts.total_candidates)
    candidate_starts = starts + contextual_total + stride * history_lengths
    candidate_index = candidate_starts[candidate_ids] + candidate_pos
    item_starts = lengths_to_offsets(item_lengths)[:-1]
    return _TokenLayout(
        lengths=lengths,
        offsets=offsets,
        num_candidates=num_candidates,
        history_lengths=history_lengths,
        contextual_total=contextual_total,
        counts=counts,
        history_rows=item_starts[history_ids] + event,
        candidate_rows=(item_starts + history_lengths)[candidate_ids] + candidate_pos,
        contextual_index=contextual_index,
        history_ids=history_ids,
        event=event,
        history_item_index=history_item_index,
        history_event_end_index=history_item_index + 1 if with_actions else history_item_index,
        candidate_ids=candidate_ids,
        candidate_pos=candidate_pos,
        candidate_index=candidate_index,
    )


def _positions(layout: _TokenLayout, count_from: str) -> tuple[Tensor, Tensor]:
    """`[H]` history and `[C]` candidate positions: counted back from the latest event (candidates 0), or with
    `count_from="start"` from the oldest event (candidates numbered after the history)."""
    if count_from == "start":
        return layout.event, layout.history_lengths[layout.candidate_ids] + layout.candidate_pos
    return layout.history_lengths[layout.history_ids] - layout.event, torch.zeros_like(layout.candidate_pos)


def _item_times(inputs: SequenceInputs, item_lengths: Tensor, checked: bool) -> Tensor | None:
    """`[N]` int64 item timestamps on the items' device, or None without timestamps; checks their alignment unless
    it was `checked` on the host."""
    if inputs.timestamps is None:
        return None
    if not checked and not torch.equal(inputs.timestamps.lengths().to(torch.int64), item_lengths):
        raise ValueError(f"the timestamps must align with the item feature {inputs.item_feature_name!r}")
    return inputs.timestamps.values().to(device=item_lengths.device, dtype=torch.int64)


def _query_times(item_times: Tensor, item_lengths: Tensor) -> Tensor:
    """`[B]` latest item time per user (0 for a user without items)."""
    item_ids, _ = token_coordinates(item_lengths, item_times.shape[0])
    return torch.zeros_like(item_lengths).scatter_reduce(0, item_ids, item_times, reduce="amax", include_self=False)


def _ages(item_times: Tensor, query_times: Tensor, layout: _TokenLayout, time_from: str) -> tuple[Tensor, Tensor]:
    """`[H]` history and `[C]` candidate ages: query time minus token time, or since the previous event."""
    history_times, candidate_times = _split_items(item_times, layout)
    if time_from == "previous":
        history_ids, candidate_ids = layout.history_ids, layout.candidate_ids
        return _times_since_previous_event(
            history_times, layout.event, history_ids, layout.history_lengths, candidate_times, candidate_ids
        )
    return (
        query_times[layout.history_ids] - history_times,
        query_times[layout.candidate_ids] - candidate_times,
    )


def _token_times(item_times: Tensor, query_times: Tensor, layout: _TokenLayout, total: int) -> Tensor:
    """`[L]` token times: an item (and its action) its own time, a contextual token the user's latest time."""
    history_times, candidate_times = _split_items(item_times, layout)
    token_times = query_times.repeat_interleave(layout.lengths, output_size=total)
    token_times = token_times.index_put((layout.history_item_index,), history_times)
    token_times = token_times.index_put((layout.history_event_end_index,), history_times)
    return token_times.index_put((layout.candidate_index,), candidate_times)


def _split_items(rows: Tensor, layout: _TokenLayout) -> tuple[Tensor, Tensor]:
    """(`[H, ...]` history rows, `[C, ...]` candidate rows) of per-item `rows [N, ...]`, user by user."""
    return rows.index_select(0, layout.history_rows), rows.index_select(0, layout.candidate_rows)


def _check_aligned(name: str, jagged: JaggedTensor, lengths: Tensor, item_name: str) -> None:
    if not torch.equal(jagged.lengths().to(torch.int64), lengths):
        raise ValueError(f"feature {name!r} must have the same per-user lengths as the item feature {item_name!r}")


class HSTUPreprocessor(nn.Module):
    """Builds an `HSTUSequence` from the embedding lookups of a batch (see the module docstring)."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.dropout = config.dropout
        self.scaling_seqlen = config.scaling_seqlen
        self.position_encoder = (
            PositionTimeEncoder(config.position_encoding, config.hidden_size)
            if config.position_encoding is not None
            else None
        )
        scale = config.position_encoding is not None and config.position_encoding.scale_embeddings
        self.embedding_scale = math.sqrt(config.hidden_size) if scale else 1.0

    def _scaled(self, values: Tensor) -> Tensor:
        return values * self.embedding_scale if self.embedding_scale != 1.0 else values

    def _check_width(self, name: str, values: Tensor) -> None:
        if values.shape[-1] != self.hidden_size:
            raise ValueError(
                f"embeddings of feature {name!r} have width {values.shape[-1]}, but the HSTU hidden_size is "
                f"{self.hidden_size}: every table feeding the sequence must have dim == hidden_size"
            )

    def _encoded(self, values: Tensor, positions: Tensor, ages: Tensor | None) -> Tensor:
        return self.position_encoder(values, positions, ages) if self.position_encoder is not None else values

    def forward(self, embeddings: dict[str, JaggedTensor], inputs: SequenceInputs) -> HSTUSequence:
        """Assemble tokens, add encodings and dropout. `embeddings` maps feature name -> `[N_f, D]` lookups.

        With a host copy in `inputs` no value is read back from the embeddings' device (sizes and checks come from
        the host); without one, the sizes are read in one synchronization (the alignment checks add one per
        aligned feature)."""
        counts = inputs.counts(list(embeddings))
        item_lengths, item_values = self._item_rows(embeddings, inputs, checked=counts is not None)
        contextual = [embeddings[name] for name in inputs.contextual_feature_names]
        for name, jagged in zip(inputs.contextual_feature_names, contextual):
            self._check_width(name, jagged.values())
        num_candidates = torch.zeros_like(item_lengths)
        if inputs.num_candidates is not None:
            num_candidates = inputs.num_candidates.to(device=item_lengths.device, dtype=torch.int64)
        contextual_lengths = [jt.lengths().to(torch.int64) for jt in contextual]
        with_actions = inputs.action_feature_name is not None
        layout = _token_layout(item_lengths, num_candidates, contextual_lengths, with_actions, counts)
        item_times = _item_times(inputs, item_lengths, checked=counts is not None)
        query_times = _query_times(item_times, item_lengths) if item_times is not None else None
        positions, ages = self._positions_and_ages(layout, item_times, query_times)
        sources = [(self._scaled(jt.values()), index) for jt, index in zip(contextual, layout.contextual_index)]
        sources += self._event_rows(embeddings, inputs, item_lengths, item_values, layout, positions, ages)
        total = layout.counts.total_tokens
        values = scatter_rows(sources, total) if total > 0 else item_values.new_zeros(0, self.hidden_size)
        values = F.dropout(values, p=self.dropout, training=self.training)
        timestamps = None
        if item_times is not None and query_times is not None:
            timestamps = _token_times(item_times, query_times, layout, total)
        return self._sequence(values, layout, timestamps, inputs.max_sequence_len)

    def _item_rows(
        self, embeddings: dict[str, JaggedTensor], inputs: SequenceInputs, checked: bool
    ) -> tuple[Tensor, Tensor]:
        """`[B]` int64 item lengths and `[N, D]` scaled item embeddings with the per-item side features added (their
        alignment with the items checked here unless it was `checked` on the host)."""
        item_name = inputs.item_feature_name
        if item_name not in embeddings:
            raise ValueError(f"no embeddings for the item feature {item_name!r}")
        item = embeddings[item_name]
        item_lengths = item.lengths().to(torch.int64)
        item_values = item.values()
        self._check_width(item_name, item_values)
        excluded = {item_name, inputs.action_feature_name, *inputs.contextual_feature_names}
        for name, jagged in embeddings.items():
            if name not in excluded:
                if not checked:
                    _check_aligned(name, jagged, item_lengths, item_name)
                item_values = item_values + jagged.values()
        return item_lengths, self._scaled(item_values)

    def _positions_and_ages(
        self, layout: _TokenLayout, item_times: Tensor | None, query_times: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor | None, Tensor | None]]:
        """(history, candidate) positions and (history, candidate) ages (None without timestamps)."""
        config = self.position_encoder.config if self.position_encoder is not None else None
        positions = _positions(layout, config.count_from if config is not None else "end")
        if item_times is None or query_times is None:
            return positions, (None, None)
        time_from = config.time_from if config is not None else "query"
        return positions, _ages(item_times, query_times, layout, time_from)

    def _event_rows(
        self,
        embeddings: dict[str, JaggedTensor],
        inputs: SequenceInputs,
        item_lengths: Tensor,
        item_values: Tensor,
        layout: _TokenLayout,
        positions: tuple[Tensor, Tensor],
        ages: tuple[Tensor | None, Tensor | None],
    ) -> list[tuple[Tensor, Tensor]]:
        """Encoded history item, history action and candidate rows with their destinations in the sequence."""
        history_values, candidate_values = _split_items(item_values, layout)
        history = self._encoded(history_values, positions[0], ages[0])
        candidates = self._encoded(candidate_values, positions[1], ages[1])
        rows = [(history, layout.history_item_index)]
        action_name = inputs.action_feature_name
        if action_name is not None:
            actions = embeddings[action_name]
            if inputs.host is None:
                _check_aligned(action_name, actions, item_lengths, inputs.item_feature_name)
            self._check_width(action_name, actions.values())
            action_values = self._scaled(actions.values().index_select(0, layout.history_rows))
            rows.append((self._encoded(action_values, positions[0], ages[0]), layout.history_event_end_index))
        rows.append((candidates, layout.candidate_index))
        return rows

    def _sequence(
        self, values: Tensor, layout: _TokenLayout, timestamps: Tensor | None, max_sequence_len: int
    ) -> HSTUSequence:
        return HSTUSequence(
            values=values,
            offsets=layout.offsets,
            max_len=layout.counts.max_len,
            scaling_seqlen=self.scaling_seqlen or max_sequence_len,
            num_candidates=layout.num_candidates,
            contextual_len=layout.counts.contextual_len,
            timestamps=timestamps,
            history_lengths=layout.history_lengths,
            history_item_index=layout.history_item_index,
            history_event_end_index=layout.history_event_end_index,
            candidate_index=layout.candidate_index,
        )


def _times_since_previous_event(
    history_times: Tensor,
    event: Tensor,
    history_ids: Tensor,
    history_lengths: Tensor,
    candidate_times: Tensor,
    candidate_ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """Ages for `time_from="previous"`: `[H]` time since the previous history event of the same sequence (0 for
    the first event) and `[C]` candidate time minus the sequence's last history event time (0 without history).
    History tokens are sequence-major with `event [H]` their index in the sequence."""
    previous = torch.where(event == 0, history_times, history_times.roll(1))
    last = torch.zeros_like(history_lengths).scatter_reduce(0, history_ids, history_times, "amax", include_self=False)
    candidate_ages = torch.where(
        history_lengths[candidate_ids] > 0, candidate_times - last[candidate_ids], torch.zeros_like(candidate_times)
    )
    return history_times - previous, candidate_ages
