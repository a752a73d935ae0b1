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
from gr_models.modules.jagged import lengths_to_offsets, scatter_rows, tail_mask, token_coordinates
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

    def forward(self, embeddings: dict[str, JaggedTensor], batch: Batch) -> HSTUSequence:
        """Assemble tokens, add encodings and dropout. `embeddings` maps feature name -> `[N_f, D]` lookups."""
        item_name, action_name = batch.item_feature_name, batch.action_feature_name
        if item_name not in embeddings:
            raise ValueError(f"no embeddings for the item feature {item_name!r}")
        item = embeddings[item_name]
        item_lengths = item.lengths().to(torch.int64)
        device = item_lengths.device
        item_values = item.values()
        self._check_width(item_name, item_values)
        excluded = {item_name, action_name, *batch.contextual_feature_names}
        for name, jagged in embeddings.items():
            if name not in excluded:
                _check_aligned(name, jagged, item_lengths, item_name)
                item_values = item_values + jagged.values()
        item_values = self._scaled(item_values)

        batch_size = batch.batch_size
        if batch.num_candidates is None:
            num_candidates = torch.zeros(batch_size, dtype=torch.int64, device=device)
        else:
            num_candidates = batch.num_candidates.to(device=device, dtype=torch.int64)
        history_lengths = item_lengths - num_candidates
        if bool((history_lengths < 0).any()):
            raise ValueError("num_candidates exceeds the item sequence length of some user")
        is_candidate = tail_mask(item_lengths, num_candidates)
        history_values, candidate_values = item_values[~is_candidate], item_values[is_candidate]

        stride = 2 if action_name is not None else 1
        contextual = [embeddings[name] for name in batch.contextual_feature_names]
        for name, jagged in zip(batch.contextual_feature_names, contextual):
            self._check_width(name, jagged.values())
        contextual_lengths = [jt.lengths().to(torch.int64) for jt in contextual]
        contextual_total = sum(contextual_lengths, torch.zeros_like(item_lengths))
        lengths = contextual_total + stride * history_lengths + num_candidates
        offsets = lengths_to_offsets(lengths)
        starts = offsets[:-1]

        sources: list[tuple[Tensor, Tensor]] = []
        consumed = torch.zeros_like(item_lengths)
        for jagged, ctx_lengths in zip(contextual, contextual_lengths):
            ids, pos = token_coordinates(ctx_lengths)
            sources.append((self._scaled(jagged.values()), starts[ids] + consumed[ids] + pos))
            consumed = consumed + ctx_lengths

        history_ids, event = token_coordinates(history_lengths)
        history_item_index = starts[history_ids] + contextual_total[history_ids] + stride * event
        candidate_ids, candidate_pos = token_coordinates(num_candidates)
        candidate_index = (
            starts[candidate_ids]
            + contextual_total[candidate_ids]
            + stride * history_lengths[candidate_ids]
            + candidate_pos
        )
        if self.position_encoder is not None and self.position_encoder.config.count_from == "start":
            history_positions = event
            candidate_positions = history_lengths[candidate_ids] + candidate_pos
        else:
            history_positions = history_lengths[history_ids] - event
            candidate_positions = torch.zeros_like(candidate_pos)

        timestamps = None
        history_ages = candidate_ages = None
        if batch.timestamp_feature_name is not None:
            times = batch.features[batch.timestamp_feature_name]
            if not torch.equal(times.lengths().to(torch.int64), item_lengths):
                raise ValueError(
                    f"timestamp feature {batch.timestamp_feature_name!r} must align with the item feature {item_name!r}"
                )
            item_times = times.values().to(device=device, dtype=torch.int64)
            item_ids, _ = token_coordinates(item_lengths)
            query_time = torch.zeros(batch_size, dtype=torch.int64, device=device).scatter_reduce(
                0, item_ids, item_times, reduce="amax", include_self=False
            )
            history_times, candidate_times = item_times[~is_candidate], item_times[is_candidate]
            if self.position_encoder is not None and self.position_encoder.config.time_from == "previous":
                history_ages, candidate_ages = _times_since_previous_event(
                    history_times, event, history_ids, history_lengths, candidate_times, candidate_ids
                )
            else:
                history_ages = query_time[history_ids] - history_times
                candidate_ages = query_time[candidate_ids] - candidate_times

        if self.position_encoder is not None:
            history_values = self.position_encoder(history_values, history_positions, history_ages)
            candidate_values = self.position_encoder(candidate_values, candidate_positions, candidate_ages)

        sources.append((history_values, history_item_index))
        history_event_end_index = history_item_index
        if action_name is not None:
            actions = embeddings[action_name]
            _check_aligned(action_name, actions, item_lengths, item_name)
            self._check_width(action_name, actions.values())
            action_values = self._scaled(actions.values()[~is_candidate])
            if self.position_encoder is not None:
                action_values = self.position_encoder(action_values, history_positions, history_ages)
            history_event_end_index = history_item_index + 1
            sources.append((action_values, history_event_end_index))
        sources.append((candidate_values, candidate_index))
        total = int(offsets[-1])
        values = scatter_rows(sources, total) if total > 0 else item_values.new_zeros(0, self.hidden_size)

        if batch.timestamp_feature_name is not None:
            token_times = query_time.repeat_interleave(lengths, output_size=total)
            token_times = token_times.index_put((history_item_index,), history_times)
            token_times = token_times.index_put((history_event_end_index,), history_times)
            timestamps = token_times.index_put((candidate_index,), candidate_times)

        contextual_len = 0
        if contextual and bool((contextual_total == contextual_total[0]).all()):
            contextual_len = int(contextual_total[0])
        scaling_seqlen = self.scaling_seqlen or self._static_bound(batch, stride)
        values = F.dropout(values, p=self.dropout, training=self.training)
        return HSTUSequence(
            values=values,
            offsets=offsets,
            max_len=int(lengths.max()) if batch_size > 0 else 0,
            scaling_seqlen=scaling_seqlen,
            num_candidates=num_candidates,
            contextual_len=contextual_len,
            timestamps=timestamps,
            history_lengths=history_lengths,
            history_item_index=history_item_index,
            history_event_end_index=history_event_end_index,
            candidate_index=candidate_index,
        )

    @staticmethod
    def _static_bound(batch: Batch, stride: int) -> int:
        bounds = batch.feature_to_max_seqlen
        return max(1, sum(bounds[n] for n in batch.contextual_feature_names) + stride * bounds[batch.item_feature_name])


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
