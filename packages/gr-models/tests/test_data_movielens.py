"""MovieLens readers: the shared ML-1M subset (users 1-2999), small ML-1M/ML-20M files, and bad lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from gr_models.data.collate import collate_samples
from gr_models.data.errors import DataValidationError
from gr_models.data.movielens import MovieLensDataset

SHARED_ML1M = Path(__file__).parents[3] / ".." / "shared" / "data" / "ml-1m"
SHARED_RATINGS = SHARED_ML1M / "partial" / "ratings_users0001-2999.dat.gz"


def _write_ml1m(root: Path, ratings: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text(ratings)
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (root / "movies.dat").write_bytes("1::Toy Story (1995)::Animation\n9::Caf\xe9 (1999)::Drama\n".encode("latin-1"))
    return root


ML1M_RATINGS = (
    "1::5::5::300\n1::3::2::100\n1::7::4::200\n1::2::1::200\n"  # user 1: ties at 200 keep file order
    "2::4::3::50\n2::6::4::60\n"
)


def test_ml1m_retrieval_leave_last_out_on_small_files(tmp_path):
    root = _write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    train = MovieLensDataset(root, kind="retrieval", split="train", max_sequence_length=10)
    assert train.schema.vocab_sizes["item_id"] == 10  # movies.dat lists id 9
    assert train.schema.contextual_feature_names == ("user_id", "gender", "age", "occupation", "zip_code")
    assert train[0].sequence["item_id"].tolist() == [3, 7, 2]  # time order, last rating (item 5) held out
    assert train[0].sequence["timestamp"].tolist() == [100, 200, 200]
    assert train[0].contextual["gender"].tolist() == [1]  # "F" -> 1, "M" -> 2 (sorted), 0 = unknown
    assert len(train) == 1 and train.num_skipped_users == 1  # user 2 has too few ratings for training
    evaluation = train.with_split("eval")
    assert len(evaluation) == 2
    assert evaluation[0].sequence["item_id"].tolist() == [3, 7, 2, 5] and evaluation[0].num_candidates == 1
    assert evaluation[1].contextual["gender"].tolist() == [2] and evaluation[1].contextual["age"].tolist() == [2]
    batch = collate_samples([evaluation[0], evaluation[1]], evaluation.schema)
    assert batch.num_candidates.tolist() == [1, 1] and batch.action_feature_name is None


def test_ml1m_without_contextual_features_like_the_paper(tmp_path):
    root = _write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    train = MovieLensDataset(root, kind="retrieval", max_sequence_length=10, with_user_id=False, user_features=[])
    assert train.schema.contextual_feature_names == ()
    assert "user_id" not in train.schema.vocab_sizes
    evaluation = train.with_split("eval")
    batch = collate_samples([evaluation[0], evaluation[1]], evaluation.schema)
    assert batch.features.keys() == ["item_id", "timestamp"]
    assert batch.num_candidates.tolist() == [1, 1]


def test_ml1m_ranking_multi_threshold_labels(tmp_path):
    root = _write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    dataset = MovieLensDataset(root, kind="ranking", split="full", rating_thresholds=(3, 4), max_sequence_length=10)
    assert dataset.schema.task_names == ("rating>=3", "rating>=4")
    assert dataset[0].sequence["action"].tolist() == [0, 3, 0, 3]  # ratings 2, 4, 1, 5
    batch = collate_samples([dataset[0]], dataset.schema)
    assert batch.labels.tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]


def test_ml20m_csv_and_gzip(tmp_path):
    root = tmp_path / "ml-20m"
    root.mkdir()
    with gzip.open(root / "ratings.csv.gz", "wt") as handle:
        handle.write("userId,movieId,rating,timestamp\n1,10,4.5,5\n1,11,3.5,4\n1,12,0.5,6\n2,10,5.0,1\n2,13,2.0,2\n")
    (root / "movies.csv").write_text('movieId,title,genres\n10,"Heat, the movie (1995)",Action\n20,X,Drama\n')
    dataset = MovieLensDataset(root, variant="20m", kind="ranking", split="eval", max_sequence_length=5)
    assert dataset.schema.vocab_sizes["item_id"] == 21
    assert dataset.schema.contextual_feature_names == ("user_id",)
    assert dataset[0].sequence["item_id"].tolist() == [11, 10, 12]
    assert dataset[0].sequence["action"].tolist() == [0, 1, 0]


def test_bad_ratings_lines_name_the_line(tmp_path):
    root = _write_ml1m(tmp_path / "a", "1::5::5::300\n1::3::100\n")
    with pytest.raises(DataValidationError, match=r"ratings.dat, row 1: expected 4 fields"):
        MovieLensDataset(root)
    root = _write_ml1m(tmp_path / "b", "1::5::5::300\n1::3::9::100\n")
    with pytest.raises(DataValidationError, match=r"row 1, column 'rating': rating 9.0 outside"):
        MovieLensDataset(root)
    root = _write_ml1m(tmp_path / "c", "1::5::5::300\n1::-3::4::100\n")
    with pytest.raises(DataValidationError, match=r"row 1, column 'item': negative id -3"):
        MovieLensDataset(root)
    with pytest.raises(FileNotFoundError, match=r"no ratings\.dat"):
        MovieLensDataset(tmp_path / "missing")


@pytest.mark.skipif(not SHARED_RATINGS.is_file(), reason=f"shared ML-1M subset not found at {SHARED_RATINGS}")
def test_shared_ml1m_subset():
    train = MovieLensDataset(SHARED_ML1M, ratings_path=SHARED_RATINGS, kind="retrieval", max_sequence_length=200)
    evaluation = train.with_split("eval")
    assert len(train) == len(evaluation) == 2999
    assert int(train.users.num_events.sum()) == 487_650
    assert int(train.users.num_events[0]) == 53  # user 1 rated 53 movies
    assert train.schema.vocab_sizes["item_id"] == 3953 and train.schema.vocab_sizes["user_id"] == 3000
    lengths = np.array([len(train[i].sequence["item_id"]) for i in range(0, 2999, 50)])
    assert lengths.max() == 200 and lengths.min() >= 19
    last = evaluation[0]
    assert last.sequence["item_id"][-1] == train.users.sequence["item_id"][52]
