"""Sharded dump/load at other world sizes and key distributions (2 -> 1, 1 -> 2, 2 -> 3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the harness and its scenarios live beside this file
from dynamicemb_sharded_harness import outcome

pytestmark = pytest.mark.slow  # the multi-process sharded harness (all scenarios, 1-2 min)


def test_dump_and_load_across_world_sizes_and_distributions() -> None:
    outcome("dump_and_load_across_world_sizes")


def test_custom_scores_of_sharded_tables() -> None:
    outcome("custom_scores_one_rank")


def test_admission_counters_of_sharded_tables_survive_dump_and_load() -> None:
    outcome("admission_counters_survive_sharded_dump_and_load")
