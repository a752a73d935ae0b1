"""Shard the embedding collections of a module in place: TorchRec's and dynamicemb's planner and
sharders through ``DistributedModelParallel``; data-parallel tables stay ordinary modules.

:func:`shard_embedding_modules` is the one mechanism behind :func:`gr_parallel.distribute` and
behind models that shard their own embedding child when built inside a multi-process world.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    StorageReservation,
)
from torchrec.distributed.types import ModuleSharder, ShardedModule, ShardingEnv, ShardingPlan
from torchrec.optim.keyed import KeyedOptimizer

from dynamicemb.distributed import DynamicEmbeddingBagCollectionSharder, DynamicEmbeddingCollectionSharder
from dynamicemb.planner import DynamicEmbeddingShardingPlanner, DynamicEmbParameterSharding
from gr_parallel.consistency import check_same_across_ranks
from gr_parallel.constraints import data_parallel_constraint, is_data_parallel, model_parallel_constraint, table_configs
from gr_parallel.dynamic_conversion import convert_dynamic_modules
from gr_parallel.state import get_device

__all__ = ["EmbeddingSharding", "ShardingOptions", "find_sharded_modules", "shard_embedding_modules"]

# Set on a collection left data-parallel, so that sharding the model again (e.g. ``distribute`` on
# a model that sharded its own embeddings) keeps it data-parallel without repeating the constraints.
_DATA_PARALLEL_MARK = "_gr_parallel_data_parallel"


@dataclass
class ShardingOptions:
    """How to plan and shard the embedding tables.

    constraints: TorchRec ``ParameterConstraints`` / dynamicemb ``DynamicEmbParameterConstraints``
        by table name (see :mod:`gr_parallel.constraints`). A table constrained to
        ``DATA_PARALLEL`` only is data-parallel (its collection must hold only such tables); a
        table of a standalone dynamicemb collection is dynamic with that module's options; any
        other table without a constraint is model-parallel, ``ROW_WISE`` or ``TABLE_WISE`` as the
        planner picks.
    fused_params: TorchRec fused parameters of the sharded static tables and of dynamic tables
        declared through constraints (optimizer, learning_rate, ...; default TorchRec's fused SGD).
        Standalone dynamic collections keep their own optimizer.
    hbm_cap / ddr_cap: bytes of device / host memory per rank the tables may use (default:
        the device's total memory on CUDA, TorchRec's defaults otherwise).
    storage_reservation: TorchRec ``StorageReservation`` (default: TorchRec's heuristic one).
    batch_size: per-rank batch size the planner assumes (TorchRec's default when ``None``).
    use_index_dedup: deduplicate ids before the all-to-all (dynamicemb and TorchRec, on CUDA).
    qcomm_codecs_registry: TorchRec's registry of quantized all-to-all codecs.
    """

    constraints: Mapping[str, ParameterConstraints] | None = None
    fused_params: Mapping[str, Any] | None = None
    hbm_cap: int | None = None
    ddr_cap: int | None = None
    storage_reservation: StorageReservation | None = None
    batch_size: int | None = None
    use_index_dedup: bool = False
    qcomm_codecs_registry: Mapping[str, Any] | None = None


@dataclass
class EmbeddingSharding:
    """The outcome of :func:`shard_embedding_modules`.

    plan: the TorchRec plan applied (data-parallel collections are not in it).
    sharders: the sharders it used (pass them on to ``DistributedModelParallel``).
    env / device: the TorchRec sharding environment (process group) and compute device.
    sharded_modules: path -> sharded collection (TorchRec's or dynamicemb's).
    data_parallel_modules: path -> collection left replicated.
    fused_optimizer: the in-backward optimizers of every sharded table, dynamic ones included
        (their ``param_groups``' ``lr`` is honoured from the next ``step``/``zero_grad``).
    """

    plan: ShardingPlan
    sharders: list[ModuleSharder[nn.Module]]
    env: ShardingEnv
    device: torch.device
    fused_optimizer: KeyedOptimizer
    sharded_modules: dict[str, nn.Module] = field(default_factory=dict)
    data_parallel_modules: dict[str, nn.Module] = field(default_factory=dict)


def find_sharded_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every TorchRec ``ShardedModule`` under ``module`` (not below another one), by path."""
    found: dict[str, nn.Module] = {}

    def visit(child: nn.Module, path: str) -> None:
        if isinstance(child, ShardedModule):
            found[path] = child
            return
        for name, grandchild in child.named_children():
            visit(grandchild, f"{path}.{name}" if path else name)

    visit(module, "")
    return found


def _collections(module: nn.Module) -> dict[str, nn.Module]:
    return {
        path: child
        for path, child in module.named_modules()
        if table_configs(child) and not isinstance(child, ShardedModule)
    }


def _resolve_constraints(
    collections: Mapping[str, nn.Module], given: Mapping[str, ParameterConstraints]
) -> tuple[dict[str, ParameterConstraints], dict[str, nn.Module]]:
    """All tables' constraints (defaults filled in) and the data-parallel collections by path."""
    known = {config.name for module in collections.values() for config in table_configs(module)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"constraints name tables {unknown} that the model lacks (its tables: {sorted(known)})")
    constraints = dict(given)
    data_parallel: dict[str, nn.Module] = {}
    for path, module in collections.items():
        names = [config.name for config in table_configs(module)]
        if getattr(module, _DATA_PARALLEL_MARK, False):  # declared data-parallel by an earlier call
            for name in names:
                constraints.setdefault(name, data_parallel_constraint())
        flags = {name: is_data_parallel(constraints.get(name)) for name in names}
        if all(flags.values()):
            data_parallel[path] = module
        elif any(flags.values()):
            raise ValueError(
                f"collection {path!r} mixes data-parallel tables {[n for n, f in flags.items() if f]} with "
                f"sharded tables {[n for n, f in flags.items() if not f]}: put data-parallel tables in a "
                "collection of their own"
            )
        for name in names:
            constraints.setdefault(name, model_parallel_constraint())
    for module in data_parallel.values():
        setattr(module, _DATA_PARALLEL_MARK, True)
    return constraints, data_parallel


def _topology(options: ShardingOptions, env: ShardingEnv, device: torch.device) -> Topology:
    hbm_cap = options.hbm_cap
    if hbm_cap is None and device.type == "cuda":
        hbm_cap = torch.cuda.get_device_properties(device).total_memory
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return Topology(
        world_size=env.world_size,
        local_world_size=local_world_size,
        compute_device=device.type,
        hbm_cap=hbm_cap,
        ddr_cap=options.ddr_cap,
    )


def _plan_summary(plan: ShardingPlan) -> list[Any]:
    """What must agree across ranks: per table its sharding type, kernel, ranks and shard shapes."""
    summary = []
    for path in sorted(plan.plan):
        for table, sharding in sorted(plan.plan[path].items()):  # type: ignore[attr-defined]
            spec = sharding.sharding_spec
            shards = [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in spec.shards] if spec else None
            summary.append([path, table, sharding.sharding_type, sharding.compute_kernel, sharding.ranks, shards])
    return summary


def _sharders(
    options: ShardingOptions, fused_params_by_module: Mapping[str, Mapping[str, Any]]
) -> list[ModuleSharder[nn.Module]]:
    """dynamicemb's sharders of ``EmbeddingCollection`` / ``EmbeddingBagCollection`` (ordinary tables
    go on to TorchRec's); converted standalone collections keep their own optimizer by module path."""
    common: dict[str, Any] = {
        "fused_params": dict(options.fused_params) if options.fused_params is not None else None,
        "use_index_dedup": options.use_index_dedup,
        "qcomm_codecs_registry": dict(options.qcomm_codecs_registry) if options.qcomm_codecs_registry else None,
        "module_fused_params": fused_params_by_module,
    }
    return [DynamicEmbeddingCollectionSharder(**common), DynamicEmbeddingBagCollectionSharder(**common)]  # type: ignore[list-item]


def _fbgemm_has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::permute_2D_sparse_data", "CUDA")


def _check_static_tables_can_run(plan: ShardingPlan, device: torch.device) -> None:
    """Sharded static tables run fbgemm's kernels; a CPU-only fbgemm build has none for CUDA."""
    if device.type != "cuda" or _fbgemm_has_cuda_kernels():
        return
    static = sorted(
        table
        for module_plan in plan.plan.values()
        for table, sharding in module_plan.items()  # type: ignore[attr-defined]
        if not isinstance(sharding, DynamicEmbParameterSharding)
    )
    if static:
        raise NotImplementedError(
            f"static tables {static} would be sharded on CUDA with fbgemm's kernels, but the installed fbgemm has "
            "no CUDA kernels (fbgemm-gpu-cpu): make them dynamic (DynamicEmbParameterConstraints(use_dynamicemb=True)) "
            "or data-parallel (gr_parallel.data_parallel_constraint()), or install the CUDA fbgemm-gpu build that "
            "matches torchrec"
        )


def _plan(
    module: nn.Module,
    constraints: dict[str, ParameterConstraints],
    sharders: list[ModuleSharder[nn.Module]],
    options: ShardingOptions,
    env: ShardingEnv,
    device: torch.device,
) -> ShardingPlan:
    """Every rank plans alike (so a table that does not fit raises on every rank, not only on one)."""
    planner = DynamicEmbeddingShardingPlanner(
        topology=_topology(options, env, device),
        batch_size=options.batch_size,
        storage_reservation=options.storage_reservation,
        constraints=constraints,
        debug=False,
    )
    try:
        return planner.plan(module, sharders)
    except PlannerError as error:
        if error.error_type is not PlannerErrorType.INSUFFICIENT_STORAGE:
            raise
        raise ValueError(
            f"the embedding tables do not fit the memory budget (ShardingOptions hbm_cap/ddr_cap): {error}"
        ) from error


def shard_embedding_modules(
    module: nn.Module,
    options: ShardingOptions | None = None,
    *,
    device: torch.device | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> EmbeddingSharding:
    """Shard, in place, every embedding collection under ``module`` that is not data-parallel.

    Tables of TorchRec ``EmbeddingCollection`` / ``EmbeddingBagCollection``s and standalone
    dynamicemb collections are planned by dynamicemb's ``DynamicEmbeddingShardingPlanner`` (TorchRec's
    planner plus dynamic tables) with ``options`` and sharded by ``DistributedModelParallel`` over
    ``process_group`` (default: the world) with dynamicemb's sharders. The sharded collections
    replace the originals inside ``module`` (which must not itself be a collection); data-parallel
    collections stay as they are. Every rank must call this (it is collective) with the same
    configuration, which is checked (``RuntimeError`` naming the differing ranks). A budget the
    tables cannot fit raises ``ValueError`` on every rank.

    Inputs and outputs of the sharded collections are those of the originals: a
    ``KeyedJaggedTensor`` of this rank's ``B`` samples in, per feature ``[ids, D]`` embeddings out.
    The default RNG streams (CPU, and ``device``'s if CUDA) are as they were before the call.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_embedding_modules() needs a process group: call gr_parallel.initialize_distributed()")
    options = options or ShardingOptions()
    device = device if device is not None else get_device()
    env = ShardingEnv.from_process_group(process_group or dist.GroupMember.WORLD)
    given = dict(options.constraints or {})
    check_same_across_ranks(
        [sorted(given.items()), dict(options.fused_params or {}), str(module)],
        "the model and its sharding options",
        process_group,
    )
    # Sharding draws from the default RNG streams, differently on each rank (each initializes its own shards):
    # their states are put back afterwards, so ranks seeded alike (tensor-parallel peers) stay in step.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        converted = convert_dynamic_modules(module, env.world_size, given)
        given.update(converted.constraints)
        constraints, data_parallel = _resolve_constraints(_collections(module), given)
        sharders = _sharders(options, converted.fused_params_by_module)
        plan = _plan(module, constraints, sharders, options, env, device)
        for path in data_parallel:
            plan.plan.pop(path, None)
        _check_static_tables_can_run(plan, device)
        check_same_across_ranks(_plan_summary(plan), "the embedding sharding plan", process_group)
        dmp = DistributedModelParallel(
            module, env=env, device=device, plan=plan, sharders=sharders, init_data_parallel=False
        )
    return EmbeddingSharding(
        plan=plan,
        sharders=sharders,
        env=env,
        device=device,
        sharded_modules=find_sharded_modules(module),
        data_parallel_modules=data_parallel,
        fused_optimizer=dmp.fused_optimizer,
    )
