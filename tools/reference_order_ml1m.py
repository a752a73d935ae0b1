"""Write ML-1M ratings in the reference code's per-user order (issue 26).

The HSTU reference preprocessing (facebookresearch/generative-recommenders, ``preprocess_rating``) orders each
user's ratings with an unstable sort on the timestamp, so ratings with the same timestamp end up in an order
that differs from the ratings file. This tool reads its ``sasrec_format.csv`` (columns ``user_id``,
``sequence_item_ids``, ``sequence_ratings``, ``sequence_timestamps``: comma-separated per-user sequences) and
writes a ratings file in ML-1M's ``user::movie::rating::timestamp`` format, users in increasing id order and each
user's ratings in the CSV's sequence order, so that gr_models' loader with ``tie_order="file"`` sees exactly the
reference's sequences. It also copies ``users.dat`` and ``movies.dat`` from ``--original`` into ``--out-root`` and
prints how many users' last (test) and second-to-last items differ from gr_models' file order on ``--original``.

    .venv/bin/python tools/reference_order_ml1m.py .peers/generative-recommenders/tmp/ml-1m/sasrec_format.csv \\
        --original ../shared/data/ml-1m --out-root .data/ml-1m-reforder
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np

from gr_models.data.movielens import MovieLensDataset

RATINGS_PATH = "partial/ratings_users0001-2999.dat.gz"


def read_reference(path: Path) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """Per-user (item ids, ratings, timestamps) sequences of a sasrec_format.csv, in its order."""
    csv.field_size_limit(sys.maxsize)
    sequences = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            columns = [row[f"sequence_{name}"] for name in ("item_ids", "ratings", "timestamps")]
            items, ratings, timestamps = ([int(v) for v in c.split(",")] for c in columns)
            if not len(items) == len(ratings) == len(timestamps):
                raise ValueError(f"{path}: user {row['user_id']} has sequences of different lengths")
            if any(b < a for a, b in itertools.pairwise(timestamps)):
                raise ValueError(f"{path}: user {row['user_id']}'s timestamps are not sorted")
            sequences[int(row["user_id"])] = (items, ratings, timestamps)
    return sequences


def write_ratings(sequences: dict[int, tuple[list[int], list[int], list[int]]], path: Path) -> None:
    """Write ``user::movie::rating::timestamp`` lines (gzip when ``path`` ends in .gz), users in id order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for user in sorted(sequences):
            for item, rating, timestamp in zip(*sequences[user]):
                f.write(f"{user}::{item}::{rating}::{timestamp}\n")


def our_sequences(root: Path, ratings_path: str) -> dict[int, np.ndarray]:
    """gr_models' per-user item-id sequences (``tie_order="file"``), oldest first: user id -> int64 ``[n]``."""
    dataset = MovieLensDataset(root, ratings_path=ratings_path, tie_order="file", user_features=[])
    users = dataset.users
    user_ids = users.contextual["user_id"].values
    items, offsets = users.sequence["item_id"], users.offsets
    return {int(u): items[offsets[i] : offsets[i + 1]] for i, u in enumerate(user_ids)}


def count_differences(ours: dict[int, np.ndarray], reference: dict[int, list[int]]) -> dict[str, int]:
    """How many users' sequences, last items and second-to-last items differ between two orders."""
    if set(ours) != set(reference):
        raise ValueError(f"user sets differ: {len(ours)} in ours, {len(reference)} in the reference")
    counts = {"users": len(ours), "sequence": 0, "last": 0, "second_to_last": 0}
    for user, seq in ours.items():
        ref = reference[user]
        counts["sequence"] += list(seq) != ref
        counts["last"] += int(seq[-1]) != ref[-1]
        counts["second_to_last"] += len(ref) > 1 and int(seq[-2]) != ref[-2]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="the reference's sasrec_format.csv")
    parser.add_argument("--original", type=Path, required=True, help="ML-1M folder (users.dat, movies.dat)")
    parser.add_argument("--out-root", type=Path, required=True, help="folder to write (like --original)")
    parser.add_argument("--ratings-path", default=RATINGS_PATH, help="ratings file relative to both folders")
    args = parser.parse_args()

    reference = read_reference(args.csv)
    write_ratings(reference, args.out_root / args.ratings_path)
    for name in ("users.dat", "movies.dat"):
        shutil.copyfile(args.original / name, args.out_root / name)
    ref_items = {user: seq[0] for user, seq in reference.items()}
    before = count_differences(our_sequences(args.original, args.ratings_path), ref_items)
    print(f"original file order vs reference: {before}")
    after = count_differences(our_sequences(args.out_root, args.ratings_path), ref_items)
    print(f"written file (tie_order=file) vs reference: {after}")
    if after["sequence"]:
        raise SystemExit(f"{after['sequence']} users' sequences still differ from the reference")


if __name__ == "__main__":
    main()
