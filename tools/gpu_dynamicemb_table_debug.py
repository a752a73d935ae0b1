"""Diagnose duplicate-key insertion races of the Triton table under eviction pressure (GPU)."""

from __future__ import annotations

import glob
import os
import re

import torch

from dynamicemb.table import DynamicEmbScoreStrategy, create_hash_table


def main() -> None:
    device = torch.device("cuda")
    capacity, batch = 1 << 18, 100_000
    g = torch.Generator().manual_seed(3)
    universe = torch.randint(-(2**63), 2**63 - 1, (4 * capacity,), generator=g).unique().to(device)
    table = create_hash_table(
        init_capacity=capacity, max_capacity=capacity, score_strategy=DynamicEmbScoreStrategy.TIMESTAMP, device=device
    )
    for step in range(8):
        keys = universe[torch.randint(0, universe.numel(), (batch,), generator=g).to(device)]
        before_keys, before_slots, _ = table.export_batch(0, capacity)
        result = table.find_or_insert(keys)
        placed = result.slots >= 0
        slots, _ = table.find(keys)
        bad = placed & (slots != result.slots)
        exported, exported_slots, _ = table.export_batch(0, capacity)
        unique, counts = exported.unique(return_counts=True)
        twins = unique[counts > 1]
        print(
            f"step {step}: lanes {batch} distinct {keys.unique().numel()} refused {int((~placed).sum())} "
            f"existed {int(result.existed.sum())} evicted {result.evicted_keys.numel()} size {table.size()} "
            f"exported {exported.numel()} bad lanes {int(bad.sum())} keys with two copies {twins.numel()}"
        )
        for key in twins[:4].tolist():
            lanes = (keys == key).nonzero().squeeze(1)
            where = exported_slots[exported == key]
            st = table._storage
            print(
                f"  key {key}: lanes {lanes.tolist()} result slots {result.slots[lanes].tolist()} "
                f"existed {result.existed[lanes].tolist()} in table at {where.tolist()} "
                f"was present before: {bool((before_keys == key).any())} "
                f"at {before_slots[before_keys == key].tolist()} | digests {st.digests[where].tolist()} "
                f"epochs {st.epochs[where].tolist()} scores {st.scores[where].tolist()} "
                f"evicted? {bool((result.evicted_keys == key).any())}"
            )
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    for path in glob.glob(f"{cache}/**/insert_kernel.ptx", recursive=True)[:1]:
        with open(path) as file:
            ptx = file.read()
        ops = sorted(
            set(
                re.findall(
                    r"\b(atom\.[\w.]+|ld\.volatile[\w.]*|ld\.global[\w.]*|st\.global[\w.]*|fence[\w.]*|membar[\w.]*)",
                    ptx,
                )
            )
        )
        print(path, "\n  ", "\n   ".join(ops))


if __name__ == "__main__":
    main()
