"""Value rows read and written by slot in device memory and in pinned host memory, side by side.

One run times, for ``--rows`` distinct random slots of a ``--capacity``-row store of ``--row-dim``
fp32 columns (dim 128 + Adam's two moments by default):

- ``device``: every row in device memory (``DeviceValueStore``);
- ``host, kernel``: every row in pinned host memory, reached by one Triton kernel over the bus
  (``SplitValueStore(host_access="kernel")``, the default on CUDA);
- ``host, copy``: the same rows selected on the host and copied (``host_access="copy"``).

Operations: ``read`` of whole rows, ``read`` of the embedding columns only (``--dim``; what a
lookup reads) and ``write`` of whole rows. Medians of CUDA-event timings (``--repeats``); ``gbytes_per_s``
counts the row bytes moved. Prints a table and writes JSON rows to ``--out`` (default
``results/value_store_<device>.json`` on a GPU). ``--device cpu`` runs a small smoke test (no kernel
rows).

    python packages/dynamicemb/benchmarks/bench_value_store.py
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_support import git_commit, median_ms

from dynamicemb.storage import DeviceValueStore, SplitValueStore, ValueStore

HERE = Path(__file__).resolve().parent


def _stores(args: argparse.Namespace, device: torch.device) -> dict[str, ValueStore]:
    stores: dict[str, ValueStore] = {"device": DeviceValueStore(args.capacity, args.row_dim, torch.float32, device)}
    accesses = ("kernel", "copy") if device.type == "cuda" else ("copy",)
    for access in accesses:
        stores[f"host, {access}"] = SplitValueStore(
            args.capacity, args.row_dim, torch.float32, device, device_rows=0, host_access=access
        )
    return stores


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(args.capacity, generator=generator)[: args.rows].to(device)
    rows = torch.randn(args.rows, args.row_dim, generator=generator).to(device)
    results = []
    for name, store in _stores(args, device).items():
        store.write(slots, rows)
        if not torch.equal(store.read(slots), rows):
            raise RuntimeError(f"{name}: rows read back differ from the rows written")
        ops: list[tuple[str, int, Callable[[], object]]] = [
            ("read", args.row_dim, lambda s=store: s.read(slots)),
            ("read", args.dim, lambda s=store: s.read(slots, args.dim)),
            ("write", args.row_dim, lambda s=store: s.write(slots, rows)),
        ]
        for op, columns, fn in ops:
            ms = median_ms(device, fn, warmup=1, repeats=args.repeats)
            results.append(
                {
                    "bench": "value_store",
                    "op": op,
                    "store": name,
                    "rows": args.rows,
                    "capacity": args.capacity,
                    "row_dim": args.row_dim,
                    "columns": columns,
                    "ms": ms,
                    "gbytes_per_s": args.rows * columns * 4 / ms / 1e6,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                }
            )
        del store
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--capacity", type=int, default=None, help="rows in the store (GPU 1<<22, CPU 1<<16)")
    parser.add_argument("--rows", type=int, default=None, help="slots per call (GPU 262144, CPU 8192)")
    parser.add_argument("--row-dim", type=int, default=384)
    parser.add_argument("--dim", type=int, default=128, help="embedding columns (the leading ones)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.capacity = args.capacity or (1 << 22 if gpu else 1 << 16)
    args.rows = args.rows or (1 << 18 if gpu else 1 << 13)
    if args.rows > args.capacity:
        raise SystemExit(f"--rows {args.rows} exceeds --capacity {args.capacity}")
    rows = run(args)
    date, commit = datetime.date.today().isoformat(), args.commit or git_commit()
    for row in rows:
        row.update(date=date, commit=commit)
    print(f"{'store':>14} {'op':>6} {'columns':>8} {'ms':>9} {'GB/s':>8}")
    for row in rows:
        print(f"{row['store']:>14} {row['op']:>6} {row['columns']:>8} {row['ms']:>9.3f} {row['gbytes_per_s']:>8.1f}")
    out = args.out
    if out is None and gpu:
        out = HERE / "results" / f"value_store_{rows[0]['device'].replace(' ', '_')}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
