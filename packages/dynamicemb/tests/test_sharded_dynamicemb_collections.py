"""Sharded dynamic collections on 1, 2 and 3 gloo processes against unsharded and TorchRec references."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the harness and its scenarios live beside this file
from dynamicemb_sharded_harness import outcome

pytestmark = pytest.mark.slow  # the multi-process sharded harness (all scenarios, 1-2 min)


def test_sharded_equals_unsharded_sgd_bitwise_with_dedup_on_and_off() -> None:
    outcome("equivalence_sgd_dedup_on_off_two_ranks")


def test_sharded_equals_unsharded_adam_modulo_distribution() -> None:
    outcome("equivalence_adam_modulo_two_ranks")


def test_sharded_equals_unsharded_on_three_ranks() -> None:
    outcome("equivalence_adam_hash_three_ranks")


def test_sharded_equals_unsharded_on_one_rank_rowwise_adagrad() -> None:
    outcome("equivalence_rowwise_adagrad_one_rank")


def test_fp16_codec_sends_half_precision() -> None:
    outcome("fp16_wire_two_ranks")


def test_sharded_weighted_bag_collection_equals_unsharded() -> None:
    outcome("weighted_bags_two_ranks")


def test_dynamic_table_equals_torchrec_row_wise_fused_table() -> None:
    outcome("torchrec_static_equivalence")


def test_mixed_dmp_model_matches_unsharded_reference() -> None:
    outcome("mixed_model_matches_unsharded_reference")


def test_plan_for_another_world_size_is_refused() -> None:
    outcome("plan_for_another_world_size_is_refused")


def test_sharded_empty_batch_requires_grad_and_malformed_batch_is_refused() -> None:
    outcome("empty_and_malformed_batches_two_ranks")
