"""One rank of the HSTU tensor-parallel test (TP = world size): the split layers against the full ones in-process.

Usage: ``python hstu_tensor_parallel_worker.py OUT_DIR``. Writes ``OUT_DIR/rank<RANK>.json`` with the largest
differences from the one-rank layers (built from the same seed) and a few observations; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from worker_exit import exit_without_teardown

import gr_parallel
from gr_models.configs import KernelBackend, RelativeBiasConfig, get_hstu_config
from gr_models.modules.hstu_block import HSTUBlock
from gr_models.modules.hstu_layer import HSTULayer, TensorParallelHSTULayer, build_hstu_layer
from gr_models.modules.preprocessing import HSTUSequence
from gr_parallel.grads import clip_grad_norm_
from gr_parallel.tensor_parallel import shard_of

HIDDEN, HEADS, HEAD_DIM, LAYERS, STEPS = 8, 4, 4, 2, 3


def _config(heads: int = HEADS, **overrides):
    settings = dict(
        kernel_backend=KernelBackend.PYTORCH,
        relative_bias=RelativeBiasConfig(max_relative_position=4, num_time_buckets=6),
    )
    settings.update(overrides)
    return get_hstu_config(HIDDEN, HEAD_DIM, heads, LAYERS, **settings)


def _sequence() -> HSTUSequence:
    lengths, targets = [5, 3, 6], [1, 0, 2]
    timestamps = torch.arange(sum(lengths)) * 3 + 1
    return HSTUSequence.for_layers(lengths, targets, scaling_seqlen=7, contextual_len=1, timestamps=timestamps)


def _shard_like(full: Tensor, local: Tensor, rank: int, size: int) -> Tensor:
    """The part of a one-rank tensor that a tensor-parallel parameter holds (by its Megatron attributes)."""
    if not getattr(local, "tensor_model_parallel", False):
        return full
    return shard_of(full, local.partition_dim, rank, size, local.partition_stride)


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _max_param_diff(split: nn.Module, full: nn.Module, rank: int, size: int, grads: bool = False) -> float:
    full_params = dict(full.named_parameters())
    worst = 0.0
    for name, local in split.named_parameters():
        a, b = (local.grad, full_params[name].grad) if grads else (local, full_params[name])
        worst = max(worst, _diff(a, _shard_like(b, local, rank, size)))
    return worst


def _perturb(split: nn.Module, full: nn.Module, rank: int, size: int) -> None:
    """Non-trivial LayerNorm, bias and relative-bias values, equal in both (the one-rank noise, sharded)."""
    generator = torch.Generator().manual_seed(7)
    full_params = dict(full.named_parameters())
    with torch.no_grad():
        for name, local in split.named_parameters():
            noise = 0.1 * torch.randn(full_params[name].shape, generator=generator)
            full_params[name].add_(noise)
            local.add_(_shard_like(noise, local, rank, size))


def _run(layers: nn.ModuleList, x: Tensor, upstream: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    sequence = _sequence()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for layer in layers:
            x = layer(x, sequence)
    x.float().backward(upstream)
    return x


def _train_and_compare(config, rank: int, size: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    torch.manual_seed(11)
    full = nn.ModuleList(HSTULayer(config) for _ in range(LAYERS))
    torch.manual_seed(11)
    split = nn.ModuleList(build_hstu_layer(config) for _ in range(LAYERS))
    out = {"init": _max_param_diff(split, full, rank, size)}
    _perturb(split, full, rank, size)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (full, split)]
    data = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        x = torch.randn(14, HIDDEN, generator=data)
        upstream = torch.randn(14, HIDDEN, generator=data)
        x_full, x_split = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_full, y_split = _run(full, x_full, upstream, dtype), _run(split, x_split, upstream, dtype)
        if step == 0:
            out["output"] = _diff(y_split, y_full)
            out["input_grad"] = _diff(x_split.grad, x_full.grad)
            out["param_grads"] = _max_param_diff(split, full, rank, size, grads=True)
            out["input_grad_scale"] = x_full.grad.abs().max().item()
            out["param_grad_scale"] = max(p.grad.abs().max().item() for p in full.parameters())
        norm_full = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.5)
        norm_split = clip_grad_norm_(split.parameters(), 0.5)
        out[f"clip_norm_step{step}"] = _diff(norm_split, norm_full)
        out[f"clip_norm_value_step{step}"] = norm_full.item()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    out["updated_params"] = _max_param_diff(split, full, rank, size)
    return out


def _structure(config, rank: int, size: int) -> dict[str, object]:
    torch.manual_seed(11)
    full = HSTULayer(config)
    torch.manual_seed(11)
    split = build_hstu_layer(config)
    state = split.state_dict()
    return {
        "layer_type": type(split).__name__,
        "block_layer_type": type(HSTUBlock(config).layers[0]).__name__,
        "same_state_keys": list(state) == list(full.state_dict()),
        "local_uvqk_rows": state["uvqk.weight"].shape[0],
        "local_output_columns": state["output.weight"].shape[1],
        "is_hstu_layer": isinstance(split, HSTULayer),
    }


def _dropout(config) -> dict[str, object]:
    torch.manual_seed(11)
    layer = build_hstu_layer(config)
    x = torch.randn(14, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = layer(x, _sequence())
        layer.eval()
        evaluated = layer(x, _sequence())
    same = trained.clone()
    torch.distributed.broadcast(same, src=0)
    return {"dropout_train_vs_eval": _diff(trained, evaluated), "dropout_ranks_agree": _diff(trained, same)}


def main(out_dir: Path) -> None:
    gr_parallel.initialize_distributed()
    size = gr_parallel.get_world_size()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=size)
    gr_parallel.set_random_seed(1234)
    rank = gr_parallel.get_tensor_model_parallel_rank()
    report: dict[str, object] = _structure(_config(), rank, size)
    report["fp32"] = _train_and_compare(_config(), rank, size)
    report["recompute"] = _train_and_compare(_config(recompute_cheap_activations=True), rank, size)
    report["bf16"] = _train_and_compare(_config(), rank, size, torch.bfloat16)
    report.update(_dropout(_config(dropout=0.5)))
    try:
        TensorParallelHSTULayer(_config(heads=3))
        report["bad_heads_error"] = None
    except ValueError as error:
        report["bad_heads_error"] = str(error)
    for name, overrides in (
        ("plain_norm_error", dict(layer_norm_affine=False)),
        ("next_token_error", dict(relative_bias=RelativeBiasConfig(query_time="next_token"))),
    ):
        try:
            TensorParallelHSTULayer(_config(**overrides))
            report[name] = None
        except NotImplementedError as error:
            report[name] = str(error)
    gr_parallel.destroy_global_state()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
