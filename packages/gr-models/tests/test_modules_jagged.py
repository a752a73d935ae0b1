"""gr_models.modules.jagged helpers."""

from __future__ import annotations

import torch

from gr_models.modules.jagged import token_coordinates


def test_token_coordinates_with_and_without_the_known_total() -> None:
    lengths = torch.tensor([3, 0, 1, 2])
    ids, positions = token_coordinates(lengths)
    assert ids.tolist() == [0, 0, 0, 2, 3, 3] and positions.tolist() == [0, 1, 2, 0, 0, 1]
    given_ids, given_positions = token_coordinates(lengths, total=6)
    assert torch.equal(given_ids, ids) and torch.equal(given_positions, positions)
