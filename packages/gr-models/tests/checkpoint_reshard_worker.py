"""One rank of the checkpoint resharding test (any world size; tensor-parallel size from argv).

Usage: ``python checkpoint_reshard_worker.py OUT_DIR TP save NAME`` or ``... OUT_DIR TP load NAME [NAME ...]``.

The model is gr-train's tiny ranking GR (``build_model``; distributed over the world when it has several ranks): a
dynamic item table, a model-parallel static table (row-wise sharded over the world), a data-parallel action table,
one HSTU layer with its heads split over ``TP`` ranks. ``save`` trains ``TRAIN_STEPS`` steps (each data-parallel
rank its share of a fixed global batch; dense Adam, fused sparse optimizers, row optimizer of the data-parallel
table), saves with ``gr_checkpoint.save`` to ``OUT_DIR/NAME``, records the evaluation logits of a fixed batch,
trains one more step and records them again. ``load`` builds the model from another seed, loads each checkpoint,
records the logits, trains that same further step and records them again. Global rank 0 writes
``OUT_DIR/<mode>-<NAME>-w<world>-tp<TP>.json``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
from worker_exit import exit_without_teardown

import gr_checkpoint
import gr_parallel
from gr_models.data.collate import collate_samples
from gr_models.trainer import build_model, build_train_dataset, initialize_run_world, load_config
from gr_models.trainer.table_optimizer_state import fused_state_to_row_optimizers
from gr_models.trainer.world import RunWorld

GLOBAL_BATCH, TRAIN_STEPS = 8, 2


def _config(tp: int, seed: int) -> Any:
    return load_config(
        None,
        [
            "device=cpu",
            f"seed={seed}",
            f"parallel.tensor_model_parallel_size={tp}",
            "data.options={num_users: 40, num_items: 30, num_clusters: 2, min_events: 6, max_events: 12, num_tasks: 2}",
            "data.max_sequence_length=10",
            "data.holdout=2",
            "data.max_train_candidates=2",
            "hstu={hidden_size: 8, kv_channels: 4, num_attention_heads: 2, num_layers: 1, dropout: 0.0}",
            "embeddings.default={type: static, optimizer: rowwise_adagrad, learning_rate: 0.05}",
            "embeddings.tables={item_id: {type: dynamic, initializer: constant, init_value: 0.05}, "
            "action: {sharding_type: data_parallel}}",
        ],
    )


def _global_batch(dataset: Any, step: int) -> list[Any]:
    users = [(step * GLOBAL_BATCH + i) % len(dataset) for i in range(GLOBAL_BATCH)]
    return [dataset[u] for u in users]


def _train_step(model: Any, optimizers: list[Any], world: RunWorld, dataset: Any, step: int) -> None:
    """One step on this data-parallel rank's contiguous share of global batch ``step`` (loss: the global mean)."""
    samples = _global_batch(dataset, step)
    share = GLOBAL_BATCH // world.dp_size
    batch = collate_samples(samples[world.dp_rank * share : (world.dp_rank + 1) * share], dataset.schema)
    losses, _ = model(batch)
    world.mean_over_global_batch(losses).backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _logits(model: Any, dataset: Any) -> list[list[float]]:
    """Logits of one fixed batch, evaluated whole on every rank (sharded lookups are collective)."""
    model.eval()
    logits = model.evaluate_batch(collate_samples(_global_batch(dataset, 100), dataset.schema))["logits"]
    model.train()
    return logits.tolist()


def _build(tp: int, seed: int, world: RunWorld | None = None) -> tuple[Any, ...]:
    config = _config(tp, seed)
    world = initialize_run_world(config) if world is None else world
    torch.manual_seed(seed)
    dataset = build_train_dataset(config.data, config.task)
    model = build_model(config, dataset.schema, world.device)
    dense = torch.optim.Adam(list(model.dense_parameters()), lr=0.01)
    return world, dataset, model, dense, model.sparse_optimizers()


def _record(out_dir: Path, world: RunWorld, tp: int, mode: str, name: str, model: Any, record: dict) -> None:
    if world.rank == 0:
        path = out_dir / f"{mode}-{name}-w{world.world_size}-tp{tp}.json"
        path.write_text(json.dumps({"placement": model.embedding.table_placement(), **record}))


def _save(out_dir: Path, name: str, model: Any, dense: Any, sparse: dict, step: int) -> None:
    extra = {"sparse": {table: opt.state_dict() for table, opt in sparse.items()}}
    gr_checkpoint.save(out_dir / name, model, dense, extra_state=extra, step=step)


def main(out_dir: Path, tp: int, mode: str, names: list[str]) -> None:
    """``save NAME``: train from scratch, save. ``load NAME [NAME ...]``: a fresh model per checkpoint, loaded;
    ``load NAME --then-save NEW``: load NAME, train one step, save NEW."""
    then_save = names[names.index("--then-save") + 1] if "--then-save" in names else None
    names = names[: names.index("--then-save")] if then_save else names
    world = None
    for name in names:
        world, dataset, model, dense, sparse = _build(tp, seed=0 if mode == "save" else 5, world=world)
        optimizers = [dense, *sparse.values()]
        if mode == "save":
            for step in range(TRAIN_STEPS):
                _train_step(model, optimizers, world, dataset, step)
            _save(out_dir, name, model, dense, sparse, TRAIN_STEPS)
        else:
            extra = gr_checkpoint.load(out_dir / name, model, dense)
            for table, optimizer in sparse.items():
                if table in extra["sparse"]:
                    optimizer.load_state_dict(extra["sparse"][table])
            sharded_when_saved = sorted(set(sparse) - set(extra["sparse"]))
            if sharded_when_saved:  # unsharded here: their row optimizers take the fused optimizer's state
                assert not fused_state_to_row_optimizers(out_dir / name, model, sparse, sharded_when_saved)
        step = gr_checkpoint.read_manifest(out_dir / name).step
        after_load = _logits(model, dataset)
        _train_step(model, optimizers, world, dataset, step)
        _record(
            out_dir, world, tp, mode, name, model, {"logits": after_load, "logits_after_step": _logits(model, dataset)}
        )
        if then_save:
            _save(out_dir, then_save, model, dense, sparse, step + 1)
            after_save = _logits(model, dataset)
            _train_step(model, optimizers, world, dataset, step + 1)
            record = {"logits": after_save, "logits_after_step": _logits(model, dataset)}
            _record(out_dir, world, tp, "save", then_save, model, record)
    # While the distributed model lives (it sits in reference cycles), destroy_global_state defers the teardown to
    # the interpreter exit, which exit_without_teardown skips: free it first.
    del model, dense, sparse, optimizers
    gc.collect()
    gr_parallel.destroy_global_state()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    exit_without_teardown()
