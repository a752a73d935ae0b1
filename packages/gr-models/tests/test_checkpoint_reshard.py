"""gr_checkpoint of the distributed GR loads at another (world size, tensor-parallel size), with the same outputs.

`checkpoint_reshard_worker.py` trains gr-train's tiny ranking GR (dynamic item table, row-wise sharded static
tables, a data-parallel action table, one HSTU layer) and saves it. Four launches:

1. world 2, TP 1: train 2 steps, save A;
2. world 4, TP 2 (heads split over 2 ranks, 2 data-parallel ranks): load A; train a step; save B;
3. one process: load A, then (a fresh model) B;
4. world 2, TP 2: load A, then B.

So A (world 2, TP 1) loads at (1, 1), (4, 2) and (2, 2), and B (saved with TP-sharded parameters, world 4) at (1, 1)
and (2, 2). Each load gives the saving run's evaluation logits on a fixed batch, and one more training step after
the load gives the saving run's next logits: dense Adam state, the fused row-wise AdaGrad state of the sharded
static tables (in one process, where those tables are unsharded, handed to gr-models' row optimizers by
`gr_models.trainer.table_optimizer_state`), the dynamic rows' optimizer state and the data-parallel table's row
optimizer state came back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gr_checkpoint import read_manifest

WORKER = Path(__file__).with_name("checkpoint_reshard_worker.py")


pytestmark = pytest.mark.slow  # torchrun runs at several world sizes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, *args: str, cwd: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        launcher += [f"--master_port={_free_port()}"]
    run = subprocess.run([*launcher, str(WORKER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def _record(folder: Path, mode: str, name: str, world: int, tp: int) -> dict:
    return json.loads((folder / f"{mode}-{name}-w{world}-tp{tp}.json").read_text())


def _flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def test_checkpoints_load_at_other_world_and_tensor_parallel_sizes(tmp_path: Path) -> None:
    out = str(tmp_path)
    _launch(2, out, "1", "save", "A", cwd=tmp_path)
    _launch(4, out, "2", "load", "A", "--then-save", "B", cwd=tmp_path)
    _launch(1, out, "1", "load", "A", "B", cwd=tmp_path)
    _launch(2, out, "2", "load", "A", "B", cwd=tmp_path)

    manifest = read_manifest(tmp_path / "B")
    assert manifest.world_size == 4
    # saved by their global shapes: 2 heads x 4 (u, v, q, k) x 4 channels, hidden 8
    assert manifest.model_tensors["hstu_block.layers.0.uvqk.weight"].shape == (32, 8)
    assert manifest.model_tensors["hstu_block.layers.0.output.weight"].shape == (8, 8)
    assert manifest.optimizer_tensors["hstu_block.layers.0.uvqk.weight.exp_avg"].shape == (32, 8)

    saved = {"A": _record(tmp_path, "save", "A", 2, 1), "B": _record(tmp_path, "save", "B", 4, 2)}
    assert saved["A"]["placement"]["user_id_table"] == "sharded"
    assert saved["A"]["placement"]["action_table"] == "replicated"
    loads = [("A", 4, 2), ("A", 1, 1), ("A", 2, 2), ("B", 1, 1), ("B", 2, 2)]
    for name, world, tp in loads:
        loaded = _record(tmp_path, "load", name, world, tp)
        where = f"{name} loaded at world {world}, TP {tp}"
        assert _flat(loaded["logits"]) == pytest.approx(_flat(saved[name]["logits"]), rel=1e-5, abs=1e-6), where
        after, expected = _flat(loaded["logits_after_step"]), _flat(saved[name]["logits_after_step"])
        assert after == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{where}, after one more step"
