"""One training step of a dynamic table vs ``nn.Embedding`` + ``torch.optim.Adam`` on the same rows.

The table holds ``num_rows`` keys (load factor 0.5 of its capacity, all rows in device memory).
A step takes ``num_keys`` ids drawn uniformly from those rows (duplicates included) and runs:
dedup (``torch.unique``), hash lookup, gather, expand to the ids, backward of a fixed output
gradient (``index_add_`` per unique key) and the fused Adam update of the unique rows.
The baseline is the same step on ``nn.Embedding(num_rows, dim)``: gather, dense backward, and
``torch.optim.Adam`` (``fused=True`` on CUDA) over the whole table. Medians over ``repeats``.

Run: ``python bench_train_step.py [--device cuda] [--dims 32 128] [--keys 1000000] [--out f.json]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from benchmark_support import median_ms

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    dynamic_embedding_lookup,
)

LEARNING_RATE = 1e-3


def _dynamic_table(
    device: torch.device, dim: int, num_rows: int, weights: torch.Tensor, hash_backend: str
) -> DynamicEmbeddingTable:
    capacity = 2 * num_rows
    row_bytes = 3 * dim * 4
    table = DynamicEmbeddingTable(
        name=f"bench_{dim}",
        dim=dim,
        num_embeddings=num_rows,
        options=DynamicEmbTableOptions(
            init_capacity=capacity, max_capacity=capacity, global_hbm_for_values=capacity * row_bytes
        ),
        optimizer=DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=LEARNING_RATE),
        device=device,
        hash_backend=hash_backend,
    )
    keys = torch.arange(num_rows, device=device)
    table.import_rows(keys, weights, None, torch.zeros(num_rows, dtype=torch.int64, device=device))
    return table


def run_train_step_benchmark(
    device: torch.device,
    dims: Sequence[int] = (32, 128),
    num_keys: int = 1_000_000,
    num_rows: int = 1 << 20,
    warmup: int = 3,
    repeats: int = 10,
    hash_backend: str = "auto",
) -> list[dict]:
    """Rows ``{op, dim, load_factor, ms, baseline, ...}``: ``ms`` the dynamic step, ``baseline`` the
    ``nn.Embedding`` + ``torch.optim.Adam`` step, both in milliseconds; ``forward_ms`` the dynamic
    forward alone."""
    device = torch.device(device)
    rows = []
    for dim in dims:
        generator = torch.Generator(device=device).manual_seed(dim)
        weights = torch.randn(num_rows, dim, device=device, generator=generator) * 0.01
        ids = torch.randint(0, num_rows, (num_keys,), device=device, generator=generator)
        grad_out = torch.randn(num_keys, dim, device=device, generator=generator)

        table = _dynamic_table(device, dim, num_rows, weights, hash_backend)

        def dynamic_step(table=table, ids=ids, grad_out=grad_out) -> None:
            dynamic_embedding_lookup(table, ids, training=True).backward(grad_out)

        def dynamic_forward(table=table, ids=ids) -> None:
            with torch.no_grad():
                dynamic_embedding_lookup(table, ids, training=True)

        dynamic_ms = median_ms(device, dynamic_step, warmup, repeats)
        forward_ms = median_ms(device, dynamic_forward, warmup, repeats)
        load_factor = table.load_factor()
        unique = torch.unique(ids).numel()
        del table

        embedding = torch.nn.Embedding(num_rows, dim, device=device, _weight=weights.clone())
        adam = torch.optim.Adam(embedding.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")

        def static_step(embedding=embedding, adam=adam, ids=ids, grad_out=grad_out) -> None:
            embedding(ids).backward(grad_out)
            adam.step()
            adam.zero_grad(set_to_none=True)

        static_ms = median_ms(device, static_step, warmup, repeats)
        del embedding, adam
        rows.append(
            {
                "op": "train_step_adam",
                "dim": dim,
                "load_factor": round(load_factor, 4),
                "keys": num_keys,
                "unique_keys": unique,
                "rows": num_rows,
                "ms": round(dynamic_ms, 4),
                "forward_ms": round(forward_ms, 4),
                "baseline": round(static_ms, 4),
                "baseline_op": "nn.Embedding + torch.optim.Adam" + (" (fused)" if device.type == "cuda" else ""),
                "ratio_to_baseline": round(dynamic_ms / static_ms, 3),
                "hash_backend": hash_backend,
            }
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--keys", type=int, default=None, help="ids per step (default 1M on CUDA, 32k on CPU)")
    parser.add_argument("--rows", type=int, default=None, help="table rows (default 1M on CUDA, 64k on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hash-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    rows = run_train_step_benchmark(
        device,
        args.dims,
        num_keys=args.keys or (1_000_000 if on_gpu else 1 << 15),
        num_rows=args.rows or (1 << 20 if on_gpu else 1 << 16),
        repeats=args.repeats,
        hash_backend=args.hash_backend,
    )
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device: {name}")
    columns = ("dim", "lf", "keys", "unique", "ms", "fwd ms", "baseline", "ratio")
    print(f"{'op':16s} " + " ".join(f"{c:>9s}" for c in columns))
    for row in rows:
        row["device"] = name
        print(
            f"{row['op']:16s} {row['dim']:9d} {row['load_factor']:9.3f} {row['keys']:9d} {row['unique_keys']:9d} "
            f"{row['ms']:9.3f} {row['forward_ms']:9.3f} {row['baseline']:9.3f} {row['ratio_to_baseline']:9.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
