"""Collate `SequenceSample`s into a `RankingBatch` or `RetrievalBatch` (the layout of `gr_models.data.batch`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gr_models.data.batch import Batch, RankingBatch, RetrievalBatch
from gr_models.data.sample import SequenceSample
from gr_models.data.schema import DatasetSchema

__all__ = ["BatchCollator", "collate_samples"]


def _check_sample(sample: SequenceSample, index: int, schema: DatasetSchema) -> int:
    """Length of the sample's sequence after checking that it fits the schema."""
    item = sample.sequence.get(schema.item_feature_name)
    if item is None:
        raise ValueError(f"sample {index}: no item feature {schema.item_feature_name!r}")
    length = len(item)
    for name in schema.sequence_feature_names:
        if name not in sample.sequence:
            raise ValueError(f"sample {index}: no sequence feature {name!r}")
        if len(sample.sequence[name]) != length:
            raise ValueError(
                f"sample {index}: sequence feature {name!r} has {len(sample.sequence[name])} values but the item "
                f"feature has {length}"
            )
    for name in schema.contextual_feature_names:
        if name not in sample.contextual:
            raise ValueError(f"sample {index}: no contextual feature {name!r}")
    if not 0 <= sample.num_candidates <= schema.max_num_candidates or length - sample.num_candidates < 1:
        raise ValueError(
            f"sample {index}: num_candidates {sample.num_candidates} is outside [0, {schema.max_num_candidates}] "
            f"or leaves no history in {length} items"
        )
    if length > schema.max_sequence_length:
        raise ValueError(f"sample {index}: {length} items exceed max_sequence_length {schema.max_sequence_length}")
    return length


def collate_samples(samples: Sequence[SequenceSample], schema: DatasetSchema) -> Batch:
    """Stack samples into one batch on the CPU.

    Returns a `RankingBatch` (labels = action bits at the scored positions) when ``schema.kind == "ranking"``,
    else a `RetrievalBatch`. KJT keys follow ``schema.feature_names``. ``num_candidates`` is None when
    ``schema.max_num_candidates == 0``.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    item_lengths = np.array([_check_sample(s, i, schema) for i, s in enumerate(samples)], dtype=np.int64)
    values, lengths = [], []
    for name in schema.contextual_feature_names:
        parts = [np.asarray(s.contextual[name], dtype=np.int64) for s in samples]
        values.extend(parts)
        lengths.append(np.array([len(p) for p in parts], dtype=np.int64))
    for name in schema.sequence_feature_names:
        values.extend(np.asarray(s.sequence[name], dtype=np.int64) for s in samples)
        lengths.append(item_lengths)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(schema.feature_names),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
    )
    num_candidates = None
    if schema.max_num_candidates > 0:
        num_candidates = torch.tensor([s.num_candidates for s in samples], dtype=torch.int64)
    common = {
        "features": features,
        "batch_size": len(samples),
        "feature_to_max_seqlen": schema.feature_to_max_seqlen(),
        "contextual_feature_names": list(schema.contextual_feature_names),
        "item_feature_name": schema.item_feature_name,
        "action_feature_name": schema.action_feature_name,
        "max_num_candidates": schema.max_num_candidates,
        "num_candidates": num_candidates,
        "timestamp_feature_name": schema.timestamp_feature_name,
    }
    if schema.kind == "retrieval":
        return RetrievalBatch(**common)
    assert schema.action_feature_name is not None
    if num_candidates is None:
        scored = np.concatenate([s.sequence[schema.action_feature_name] for s in samples])
    else:
        action = schema.action_feature_name
        scored = np.concatenate([s.sequence[action][len(s.sequence[action]) - s.num_candidates :] for s in samples])
    bits = (scored.astype(np.int64)[:, None] >> np.arange(schema.num_tasks)) & 1
    return RankingBatch(**common, labels=torch.from_numpy(bits.astype(np.float32)))


class BatchCollator:
    """A picklable ``collate_fn`` for `torch.utils.data.DataLoader`: ``collate_samples(samples, schema)``."""

    def __init__(self, schema: DatasetSchema):
        self.schema = schema

    def __call__(self, samples: Sequence[SequenceSample]) -> Batch:
        return collate_samples(samples, self.schema)
