"""The HSTU preprocessing builds the same sequence from a batch's host copy as from its (device) tensors alone, and
refuses the same bad batches on both paths (`gr_models.data.host_view`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gr_models.configs import get_hstu_config
from gr_models.configs.hstu_config import PositionEncodingConfig
from gr_models.data.batch import RankingBatch
from gr_models.data.host_view import sequence_counts
from gr_models.modules.preprocessing import HSTUPreprocessor, SequenceInputs

D = 8


def _inputs(ctx: list[int], items: list[int], candidates: list[int], action_lengths: list[int] | None = None):
    """SequenceInputs (with host copy) and embeddings of a CPU batch: contextual "u", items, actions, timestamps."""
    action_lengths = items if action_lengths is None else action_lengths
    n, a = sum(items), sum(action_lengths)
    times = torch.cumsum(torch.arange(1, n + 1), 0) * 7
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "item", "act", "ts"],
        values=torch.cat([torch.arange(sum(ctx)), torch.arange(n), torch.arange(a) % 4, times]),
        lengths=torch.tensor(ctx + items + action_lengths + items),
    )
    batch = RankingBatch(
        features=kjt,
        batch_size=len(items),
        feature_to_max_seqlen={"u": 2, "item": 6, "act": 6, "ts": 6},
        contextual_feature_names=["u"],
        item_feature_name="item",
        action_feature_name="act",
        max_num_candidates=2,
        num_candidates=torch.tensor(candidates),
        timestamp_feature_name="ts",
    )
    generator = torch.Generator().manual_seed(0)
    embeddings = {
        "u": JaggedTensor(values=torch.randn(sum(ctx), D, generator=generator), lengths=torch.tensor(ctx)),
        "item": JaggedTensor(values=torch.randn(n, D, generator=generator), lengths=torch.tensor(items)),
        "act": JaggedTensor(values=torch.randn(a, D, generator=generator), lengths=torch.tensor(action_lengths)),
    }
    return SequenceInputs.from_batch(batch), embeddings


def _preprocessor() -> HSTUPreprocessor:
    encoding = PositionEncodingConfig(use_time_encoding=True, count_from="start", time_from="previous")
    return HSTUPreprocessor(get_hstu_config(D, D, 1, 1, position_encoding=encoding)).eval()


@pytest.mark.parametrize("ctx", [[1, 1, 1], [1, 0, 2]], ids=["same-contextual", "uneven-contextual"])
def test_host_copy_and_device_paths_build_the_same_sequence(ctx: list[int]) -> None:
    inputs, embeddings = _inputs(ctx, [3, 1, 5], [1, 1, 2])
    assert inputs.host is not None
    preprocessor = _preprocessor()
    from_host = preprocessor(embeddings, inputs)
    from_device = preprocessor(embeddings, dataclasses.replace(inputs, host=None))
    for field in dataclasses.fields(from_host):
        a, b = getattr(from_host, field.name), getattr(from_device, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name
    lengths = [c + 2 * (n - k) + k for c, n, k in zip(ctx, [3, 1, 5], [1, 1, 2])]
    assert from_host.max_len == max(lengths) and int(from_host.offsets[-1]) == sum(lengths)
    assert from_host.contextual_len == (1 if len(set(ctx)) == 1 else 0)


@pytest.mark.parametrize("host", [True, False], ids=["host-copy", "device"])
def test_both_paths_refuse_more_candidates_than_items(host: bool) -> None:
    inputs, embeddings = _inputs([1, 1], [2, 1], [1, 2])
    inputs = inputs if host else dataclasses.replace(inputs, host=None)
    with pytest.raises(ValueError, match="num_candidates exceeds"):
        _preprocessor()(embeddings, inputs)


@pytest.mark.parametrize("host", [True, False], ids=["host-copy", "device"])
def test_both_paths_refuse_actions_not_aligned_with_items(host: bool) -> None:
    inputs, embeddings = _inputs([1, 1], [2, 3], [1, 1], action_lengths=[3, 2])
    inputs = inputs if host else dataclasses.replace(inputs, host=None)
    with pytest.raises(ValueError, match="'act' must have the same per-user lengths"):
        _preprocessor()(embeddings, inputs)


def test_sequence_counts_of_an_empty_batch_are_zero() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    counts = sequence_counts(empty, empty, [empty], with_actions=True)
    assert (counts.total_tokens, counts.max_len, counts.contextual_len, counts.contextual_totals) == (0, 0, 0, (0,))
