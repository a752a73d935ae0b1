"""MovieLens-1M genres as an item side feature of ranking data (one id per event from the movie's genre set)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gr_models.data.collate import collate_samples
from gr_models.data.movielens import MovieLensDataset


def _write(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "ratings.dat").write_text("1::5::5::300\n1::3::2::100\n1::7::4::200\n1::1::1::250\n")
    (root / "users.dat").write_text("1::F::1::10::48067\n")
    (root / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Comedy\n3::Caf\xe9 (1999)::Drama\n5::X (1990)::Animation|Comedy\n".encode(
            "latin-1"
        )
    )
    return root


def test_genres_are_one_id_per_event_from_the_genre_set(tmp_path: Path) -> None:
    root = _write(tmp_path / "ml-1m")
    data = MovieLensDataset(root, kind="ranking", split="eval", holdout=2, rating_thresholds=[4.0, 5.0],
                            item_features=["genres"])  # fmt: skip
    assert data.schema.side_feature_names == ("genres",)
    assert data.schema.vocab_sizes["genres"] == 3  # 0 = movie missing from movies.dat, 1 = Animation|Comedy, 2 Drama
    sample = data[0]
    assert sample.sequence["item_id"].tolist() == [3, 7, 1, 5]
    assert sample.sequence["genres"].tolist() == [2, 0, 1, 1]
    assert sample.sequence["action"].tolist() == [0, 1, 0, 3]  # bit 0: rating >= 4, bit 1: rating >= 5
    batch = collate_samples([sample], data.schema)
    assert batch.features["genres"].values().tolist() == [2, 0, 1, 1]


def test_unknown_item_feature_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown item features"):
        MovieLensDataset(_write(tmp_path / "ml-1m"), kind="ranking", item_features=["title"])
