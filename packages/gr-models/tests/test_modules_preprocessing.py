"""HSTU preprocessing against small hand-computed token layouts."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gr_models.configs import PositionEncodingConfig, get_hstu_config
from gr_models.data.batch import RankingBatch
from gr_models.modules.preprocessing import HSTUPreprocessor, SequenceInputs

D = 4


def _codes(prefix: float, n: int) -> torch.Tensor:
    """Rows [n, D] whose first column is prefix + row index, so every token can be recognised."""
    values = torch.zeros(n, D)
    values[:, 0] = prefix + torch.arange(n, dtype=torch.float32)
    return values


def _batch(ctx_lengths, item_lengths, num_candidates, *, with_actions=True, timestamps=None):
    keys, values, lengths = ["u", "item"], [], []
    values += [torch.zeros(sum(ctx_lengths), dtype=torch.int64), torch.zeros(sum(item_lengths), dtype=torch.int64)]
    lengths += [torch.tensor(ctx_lengths), torch.tensor(item_lengths)]
    if with_actions:
        keys.append("act")
        values.append(torch.zeros(sum(item_lengths), dtype=torch.int64))
        lengths.append(torch.tensor(item_lengths))
    if timestamps is not None:
        keys.append("ts")
        values.append(torch.tensor(timestamps))
        lengths.append(torch.tensor(item_lengths))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    batch = RankingBatch(
        features=kjt,
        batch_size=len(item_lengths),
        feature_to_max_seqlen={"u": 2, "item": 3, "act": 3, "ts": 3},
        contextual_feature_names=["u"],
        item_feature_name="item",
        action_feature_name="act" if with_actions else None,
        max_num_candidates=1,
        num_candidates=torch.tensor(num_candidates),
        timestamp_feature_name="ts" if timestamps is not None else None,
    )
    return SequenceInputs.from_batch(batch)


def _embeddings(ctx_lengths, item_lengths, with_actions=True):
    out = {
        "u": JaggedTensor(values=_codes(100, sum(ctx_lengths)), lengths=torch.tensor(ctx_lengths)),
        "item": JaggedTensor(values=_codes(200, sum(item_lengths)), lengths=torch.tensor(item_lengths)),
    }
    if with_actions:
        out["act"] = JaggedTensor(values=_codes(300, sum(item_lengths)), lengths=torch.tensor(item_lengths))
    return out


def _preprocessor(**kwargs) -> HSTUPreprocessor:
    config = get_hstu_config(D, 2, 2, 1, **kwargs)
    return HSTUPreprocessor(config).eval()


def test_interleaves_items_and_actions_after_contextual_tokens_and_appends_candidates() -> None:
    # user 0: ctx u0 | items 200 201 (history) 202 (candidate); user 1: ctx u1 u2 | items 203 (history) 204 (cand)
    batch = _batch([1, 2], [3, 2], [1, 1])
    sequence = _preprocessor(use_position_encoding=False)(_embeddings([1, 2], [3, 2]), batch)
    expected_tokens = [100, 200, 300, 201, 301, 202, 101, 102, 203, 303, 204]
    assert sequence.values[:, 0].tolist() == expected_tokens
    assert sequence.offsets.tolist() == [0, 6, 11]
    assert sequence.max_len == 6
    assert sequence.num_candidates.tolist() == [1, 1]
    assert sequence.history_lengths.tolist() == [2, 1]
    assert sequence.history_item_index.tolist() == [1, 3, 8]
    assert sequence.history_event_end_index.tolist() == [2, 4, 9]
    assert sequence.candidate_index.tolist() == [5, 10]
    # users have 1 and 2 contextual tokens: not a uniform prefix, so the attention gets none
    assert sequence.contextual_len == 0
    # bound: 2 contextual + 2 * 3 item tokens
    assert sequence.scaling_seqlen == 8
    assert sequence.timestamps is None


def test_uniform_contextual_prefix_is_passed_to_attention_and_no_actions_means_no_interleave() -> None:
    batch = _batch([1, 1], [3, 2], [1, 1], with_actions=False)
    sequence = _preprocessor(use_position_encoding=False)(_embeddings([1, 1], [3, 2], with_actions=False), batch)
    assert sequence.values[:, 0].tolist() == [100, 200, 201, 202, 101, 203, 204]
    assert sequence.contextual_len == 1
    assert sequence.history_item_index.tolist() == [1, 2, 5]
    assert sequence.history_event_end_index.tolist() == [1, 2, 5]
    assert sequence.candidate_index.tolist() == [3, 6]
    assert sequence.scaling_seqlen == 2 + 3


def test_position_and_time_encodings_follow_recency() -> None:
    config = PositionEncodingConfig(
        num_position_buckets=8, use_time_encoding=True, num_time_buckets=16, time_bucket_fn="sqrt"
    )
    preprocessor = _preprocessor(position_encoding=config)
    with torch.no_grad():
        # position p adds 1000 * p to column 1; time bucket t adds t to column 2
        preprocessor.position_encoder.position_table.zero_()[:, 1] = 1000 * torch.arange(8.0)
        preprocessor.position_encoder.time_table.zero_()[:, 2] = torch.arange(16.0)
    times = [0, 36, 100, 7, 16]  # user 0 query time 100, user 1 query time 16
    batch = _batch([1, 2], [3, 2], [1, 1], timestamps=times)
    sequence = preprocessor(_embeddings([1, 2], [3, 2]), batch)
    # user 0 history events 0, 1 -> positions 2, 1; ages 100, 64 -> sqrt buckets 10, 8; candidate: position 0, age 0
    # user 1 history event 0 -> position 1, age 9 -> bucket 3; candidate: position 0, age 0
    assert sequence.values[:, 1].tolist() == [0, 2000, 2000, 1000, 1000, 0, 0, 0, 1000, 1000, 0]
    assert sequence.values[:, 2].tolist() == [0, 10, 10, 8, 8, 0, 0, 0, 3, 3, 0]
    # contextual tokens carry the user's latest timestamp; actions carry their item's
    assert sequence.timestamps.tolist() == [100, 0, 0, 36, 36, 100, 16, 16, 7, 7, 16]


def test_positions_counted_from_the_start_number_candidates_after_the_history() -> None:
    preprocessor = _preprocessor(position_encoding=PositionEncodingConfig(num_position_buckets=8, count_from="start"))
    with torch.no_grad():
        preprocessor.position_encoder.position_table.zero_()[:, 1] = 1000 * torch.arange(8.0)
    sequence = preprocessor(_embeddings([1, 2], [3, 2]), _batch([1, 2], [3, 2], [1, 1]))
    # user 0: history events 0, 1 -> positions 0, 1 (item and action share it); candidate -> 2
    # user 1: history event 0 -> position 0; candidate -> 1; contextual tokens get none
    assert sequence.values[:, 1].tolist() == [0, 0, 0, 1000, 1000, 2000, 0, 0, 0, 0, 1000]


def test_time_from_the_previous_event_uses_only_earlier_timestamps() -> None:
    config = PositionEncodingConfig(
        num_position_buckets=8, use_time_encoding=True, num_time_buckets=16, count_from="start", time_from="previous"
    )
    preprocessor = _preprocessor(position_encoding=config)
    with torch.no_grad():
        preprocessor.position_encoder.position_table.zero_()
        preprocessor.position_encoder.time_table.zero_()[:, 2] = torch.arange(16.0)
    times = [0, 36, 100, 7, 16]
    sequence = preprocessor(_embeddings([1, 2], [3, 2]), _batch([1, 2], [3, 2], [1, 1], timestamps=times))
    # user 0: history gaps 0 (first), 36 -> sqrt buckets 0, 6; candidate 100 - 36 = 64 -> 8
    # user 1: history gap 0 -> 0; candidate 16 - 7 = 9 -> 3
    assert sequence.values[:, 2].tolist() == [0, 0, 0, 6, 6, 8, 0, 0, 0, 0, 3]
    # a later event does not change the encodings of the earlier tokens
    later = preprocessor(_embeddings([1, 2], [3, 2]), _batch([1, 2], [3, 2], [1, 1], timestamps=[0, 36, 900, 7, 16]))
    assert later.values[:5, 2].tolist() == sequence.values[:5, 2].tolist()


def test_time_from_must_be_query_or_previous() -> None:
    with pytest.raises(ValueError, match="time_from"):
        PositionEncodingConfig(time_from="start")


def test_position_count_from_must_be_start_or_end() -> None:
    with pytest.raises(ValueError, match="count_from"):
        PositionEncodingConfig(count_from="middle")


def test_time_encoding_without_timestamps_fails_clearly() -> None:
    preprocessor = _preprocessor(position_encoding=PositionEncodingConfig(use_time_encoding=True))
    with pytest.raises(ValueError, match="timestamp"):
        preprocessor(_embeddings([1, 2], [3, 2]), _batch([1, 2], [3, 2], [1, 1]))


def test_embedding_width_must_match_hidden_size() -> None:
    embeddings = _embeddings([1, 2], [3, 2])
    embeddings["item"] = JaggedTensor(values=torch.zeros(5, D + 1), lengths=torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="hidden_size"):
        _preprocessor()(embeddings, _batch([1, 2], [3, 2], [1, 1]))


def test_gradients_reach_every_source_embedding() -> None:
    embeddings = _embeddings([1, 2], [3, 2])
    for jt in embeddings.values():
        jt.values().requires_grad_(True)
    sequence = _preprocessor(use_position_encoding=False)(embeddings, _batch([1, 2], [3, 2], [1, 1]))
    sequence.values.sum().backward()
    assert embeddings["u"].values().grad.sum().item() == 3 * D
    assert embeddings["item"].values().grad.sum().item() == 5 * D
    # candidate actions (the labels) are never fed: rows 2 and 4 of the action sequence get no gradient
    assert embeddings["act"].values().grad[:, 0].tolist() == [1, 1, 0, 1, 0]
