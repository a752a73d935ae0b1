"""Cost imbalance of a global batch split across data-parallel ranks, before and after balancing.

For Zipf-distributed sequence lengths (capped), each global batch of ``dp * batch`` samples is split
contiguously (the unbalanced default: rank r takes the r-th run) and by
``gr_parallel.balance.partition_by_cost`` (free sizes, and equal sample counts). The imbalance of a
split is max / mean of the ranks' costs ``sum(len**2 + a * len)``: the step waits for the heaviest
rank, so 1.0 is ideal. ``bound`` is the best any split can do, ``max(heaviest sample, mean)/mean``.

    python benchmarks/bench_balance.py                      # prints a table, writes results/balance-cpu.json
    python benchmarks/bench_balance.py --batches 20 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from gr_parallel.balance import contiguous_partition, partition_by_cost, partition_costs, sequence_cost

RESULTS = Path(__file__).resolve().parent / "results" / "balance-cpu.json"


def git_commit() -> str:
    """The short commit of the checkout holding this file, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def ratio(costs: np.ndarray, parts: list[list[int]]) -> float:
    totals = partition_costs(costs, parts)
    return float(totals.max() / totals.mean())


def measure(rng: np.random.Generator, dp: int, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Mean and worst imbalance over ``args.batches`` global batches of ``dp * batch`` samples."""
    found: dict[str, list[float]] = {"contiguous": [], "balanced": [], "balanced_equal_size": [], "bound": []}
    seconds = []
    n = dp * batch
    for _ in range(args.batches):
        lengths = np.minimum(rng.zipf(args.zipf, n), args.max_len)
        costs = sequence_cost(lengths, args.linear)
        started = time.perf_counter()
        balanced = partition_by_cost(costs, dp)
        seconds.append(time.perf_counter() - started)
        found["contiguous"].append(ratio(costs, contiguous_partition(n, dp)))
        found["balanced"].append(ratio(costs, balanced))
        found["balanced_equal_size"].append(ratio(costs, partition_by_cost(costs, dp, equal_size=True)))
        found["bound"].append(max(float(costs.max()), float(costs.sum()) / dp) / (float(costs.sum()) / dp))
    row: dict[str, float] = {"dp": dp, "batch_per_rank": batch}
    for name, values in found.items():
        row[f"{name}_mean"] = float(np.mean(values))
        row[f"{name}_max"] = float(np.max(values))
    row["partition_ms_median"] = 1e3 * float(np.median(seconds))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256], help="samples per rank")
    parser.add_argument("--zipf", type=float, default=1.5, help="Zipf exponent of the lengths")
    parser.add_argument("--max-len", type=int, default=4096, help="lengths are capped here")
    parser.add_argument("--linear", type=float, default=0.0, help="a of the cost len**2 + a*len")
    parser.add_argument("--batches", type=int, default=20, help="global batches per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = []
    header = f"{'dp':>3} {'batch':>5} | {'contiguous':>16} | {'balanced':>16} | {'equal size':>16} | {'bound':>6} | ms"
    print(f"max/mean cost imbalance, mean (worst) over {args.batches} global batches; zipf {args.zipf}, "
          f"lengths <= {args.max_len}, cost len^2 + {args.linear:g}*len")  # fmt: skip
    print(header)
    for dp in args.dp:
        for batch in args.batch:
            row = measure(rng, dp, batch, args)
            rows.append(row)
            print(
                f"{dp:>3} {batch:>5} | {row['contiguous_mean']:7.3f} ({row['contiguous_max']:6.3f}) | "
                f"{row['balanced_mean']:7.3f} ({row['balanced_max']:6.3f}) | "
                f"{row['balanced_equal_size_mean']:7.3f} ({row['balanced_equal_size_max']:6.3f}) | "
                f"{row['bound_mean']:6.3f} | {row['partition_ms_median']:.1f}"
            )
    payload = {
        "benchmark": "bench_balance",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
