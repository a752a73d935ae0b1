"""``DynamicEmbeddingShardingPlanner``: TorchRec's planner for models holding dynamic tables."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import Enumerator, ParameterConstraints, Storage, StorageReservation, Topology
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets, get_default_sharders, placement
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ModuleSharder,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from dynamicemb.distributed import DynamicEmbeddingBagCollectionSharder, DynamicEmbeddingCollectionSharder
from dynamicemb.distributed.parameter_sharding import DynamicEmbParameterSharding
from dynamicemb.optimizer import DynamicEmbOptimizerArgs
from dynamicemb.planner.constraints import DynamicEmbParameterConstraints
from dynamicemb.planner.enumerator import DynamicEmbeddingEnumerator, _without_tables, dynamic_table_names
from dynamicemb.planner.memory import DynamicTableMemory, dynamic_table_memory

__all__ = ["DynamicEmbeddingShardingPlanner", "default_sharders"]

logger = logging.getLogger(__name__)


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    """dynamicemb's sharders for ``EmbeddingCollection`` / ``EmbeddingBagCollection`` and
    TorchRec's default sharders for the other module types."""
    ours: list[ModuleSharder[nn.Module]] = [DynamicEmbeddingCollectionSharder(), DynamicEmbeddingBagCollectionSharder()]
    taken = {s.module_type for s in ours}
    return ours + [s for s in get_default_sharders() if s.module_type not in taken]


@dataclass
class _TableSite:
    """Where a table lives: the module path, its config and parameter, and the sharder of its module."""

    module_path: str
    config: BaseEmbeddingConfig
    parameter: torch.Tensor
    sharder: ModuleSharder[nn.Module]


def _table_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    for accessor in ("embedding_configs", "embedding_bag_configs"):
        if hasattr(module, accessor):
            return list(getattr(module, accessor)())
    return []


def _find_tables(module: nn.Module, sharders: Sequence[ModuleSharder[nn.Module]]) -> dict[str, _TableSite]:
    """Every table of a module that one of ``sharders`` shards, by table name (found the way
    TorchRec's enumerator walks a model)."""
    by_type = {sharder_name(s.module_type): s for s in sharders}
    sites: dict[str, _TableSite] = {}
    queue: list[tuple[str, nn.Module]] = [("", module)]
    while queue:
        path, child = queue.pop()
        sharder = by_type.get(sharder_name(type(child)))
        if sharder is None:
            queue.extend((f"{path}.{name}" if path else name, m) for name, m in child.named_children())
            continue
        configs = {config.name: config for config in _table_configs(child)}
        for name, parameter in sharder.shardable_parameters(child).items():
            if name in sites:
                raise ValueError(f"table name {name!r} is used by two modules ({sites[name].module_path!r}, {path!r})")
            if name in configs:
                sites[name] = _TableSite(path, configs[name], parameter, sharder)
    return sites


class DynamicEmbeddingShardingPlanner(EmbeddingShardingPlanner):
    """TorchRec's ``EmbeddingShardingPlanner`` that also places dynamic tables.

    Tables whose constraint is a :class:`DynamicEmbParameterConstraints` with
    ``use_dynamicemb=True`` are sharded row-wise over every rank of the topology with
    compute kernel ``CUSTOMIZED_KERNEL`` (a :class:`DynamicEmbParameterSharding` in the plan);
    their per-shard capacity is inferred (:func:`~dynamicemb.distributed.parameter_sharding.shard_capacity`)
    and their per-shard memory (:func:`~dynamicemb.planner.memory.dynamic_table_memory`) is
    taken out of every device of the topology before TorchRec plans the other tables in what
    remains. A dynamic table's module must be sharded by a dynamicemb sharder.

    ``eb_configs``: the embedding configs of the model (optional); when given, every constraint
    must name one of them. The other arguments are those of TorchRec's planner; ``enumerator``
    defaults to a :class:`DynamicEmbeddingEnumerator` over the same constraints.
    After :meth:`plan` / :meth:`collective_plan`, :attr:`dynamic_table_memory` holds the memory of
    one shard of each dynamic table.
    """

    _topology: Topology

    def __init__(
        self,
        eb_configs: Sequence[BaseEmbeddingConfig] | None = None,
        topology: Topology | None = None,
        batch_size: int | None = None,
        enumerator: Enumerator | None = None,
        storage_reservation: StorageReservation | None = None,
        constraints: dict[str, ParameterConstraints] | None = None,
        debug: bool = True,
        **kwargs: Any,
    ) -> None:
        dynamic = dynamic_table_names(constraints)
        if eb_configs is not None:
            known = {config.name for config in eb_configs}
            unknown = sorted(set(constraints or {}) - known)
            if unknown:
                raise ValueError(
                    f"constraints name tables {unknown} that are not in eb_configs (tables {sorted(known)})"
                )
        super().__init__(
            topology=topology,
            batch_size=batch_size,
            enumerator=enumerator,
            storage_reservation=storage_reservation,
            constraints=constraints,
            debug=debug,
            **kwargs,
        )
        if enumerator is None:
            self._enumerator = DynamicEmbeddingEnumerator(
                topology=self._topology, batch_size=self._batch_size, constraints=constraints
            )
        elif dynamic:
            if not isinstance(enumerator, DynamicEmbeddingEnumerator):
                raise TypeError(
                    f"the constraints mark dynamic tables {sorted(dynamic)}: the enumerator must be a "
                    f"DynamicEmbeddingEnumerator, got {type(enumerator).__name__}"
                )
            if enumerator.dynamic_tables != dynamic:
                raise ValueError(
                    f"the enumerator's constraints mark dynamic tables {sorted(enumerator.dynamic_tables)}, "
                    f"the planner's mark {sorted(dynamic)}: pass the same constraints to both"
                )
        self._dynamic_constraints: dict[str, DynamicEmbParameterConstraints] = {
            name: c
            for name, c in (constraints or {}).items()
            if isinstance(c, DynamicEmbParameterConstraints) and c.use_dynamicemb
        }
        self.dynamic_table_memory: dict[str, DynamicTableMemory] = {}

    # --- dynamic tables ---------------------------------------------------------------------------
    def _plan_dynamic(
        self, module: nn.Module, sharders: Sequence[ModuleSharder[nn.Module]]
    ) -> tuple[dict[str, dict[str, DynamicEmbParameterSharding]], Storage]:
        """The plan entries of the dynamic tables by module path, and the storage they take on every rank."""
        topology = self._topology
        world_size, local_size = topology.world_size, topology.local_world_size
        compute_device = topology.compute_device
        sites = _find_tables(module, sharders)
        unknown = sorted(set(self._dynamic_constraints) - set(sites))
        if unknown:
            raise ValueError(
                f"constraints mark dynamic tables {unknown} that the model does not have "
                f"(the tables of its modules that the sharders shard: {sorted(sites)})"
            )
        plan: dict[str, dict[str, DynamicEmbParameterSharding]] = {}
        memory: dict[str, DynamicTableMemory] = {}
        for name, constraint in self._dynamic_constraints.items():
            site = sites[name]
            if not getattr(site.sharder, "handles_dynamic_tables", False):
                raise TypeError(
                    f"table {name!r} is marked use_dynamicemb=True but its module {site.module_path or '<root>'!r} "
                    f"is sharded by {type(site.sharder).__name__}; use DynamicEmbeddingCollectionSharder / "
                    "DynamicEmbeddingBagCollectionSharder"
                )
            fused_params_for = getattr(site.sharder, "fused_params_for", None)
            fused_params = (
                fused_params_for(site.module_path) if fused_params_for else getattr(site.sharder, "fused_params", None)
            ) or {}
            optimizer = DynamicEmbOptimizerArgs.from_fused_params(fused_params)
            options = constraint.dynamicemb_options
            memory[name] = usage = dynamic_table_memory(site.config, options, optimizer, world_size, compute_device)
            sizes, offsets = calculate_shard_sizes_and_offsets(
                site.parameter, world_size, local_size, ShardingType.ROW_WISE.value
            )
            spec = EnumerableShardingSpec(
                [
                    ShardMetadata(
                        shard_offsets=offset, shard_sizes=size, placement=placement(compute_device, rank, local_size)
                    )
                    for rank, (size, offset) in enumerate(zip(sizes, offsets))
                ]
            )
            plan.setdefault(site.module_path, {})[name] = DynamicEmbParameterSharding(
                sharding_type=ShardingType.ROW_WISE.value,
                compute_kernel=EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value,
                ranks=list(range(world_size)),
                sharding_spec=spec,
                dynamicemb_options=options,
                key_distribution=constraint.key_distribution,
                shard_capacity=usage.shard_capacity,
                shard_device_bytes=usage.device_bytes,
                shard_host_bytes=usage.host_bytes,
            )
        on_device = compute_device in ("cuda", "mtia")
        need = Storage(
            hbm=sum(m.device_bytes for m in memory.values()) if on_device else 0,
            ddr=sum(m.host_bytes for m in memory.values()),
        )
        for device in topology.devices:
            if not need.fits_in(device.storage):
                detail = ", ".join(
                    f"{m.table}: {m.device_bytes} B device + {m.host_bytes} B host" for m in memory.values()
                )
                raise ValueError(
                    f"the dynamic tables do not fit on rank {device.rank}: one shard of each needs "
                    f"{need.hbm} B of HBM and {need.ddr} B of host memory ({detail}); the topology gives "
                    f"{device.storage.hbm} B of HBM and {device.storage.ddr} B of host memory per rank"
                )
        self.dynamic_table_memory = memory
        if memory:
            logger.info("dynamicemb planner: per-shard memory %s", memory)
        return plan, need

    def _plan_static(
        self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]], dynamic_storage: Storage
    ) -> ShardingPlan:
        """TorchRec's plan of the other tables, in the topology less the dynamic tables' storage.

        TorchRec sees the sharders without the dynamic tables, so a module holding only dynamic
        tables is not one that TorchRec's plan validation expects in its plan."""
        hidden = set(self._dynamic_constraints)
        views = [_without_tables(s, hidden) for s in sharders] if hidden else sharders
        full = self._topology
        reduced = copy.deepcopy(full)
        for device in reduced.devices:
            device.storage = device.storage - dynamic_storage
        self._topology = reduced
        try:
            return super().plan(module, views)
        finally:
            self._topology = full

    @staticmethod
    def _merge(static: ShardingPlan, dynamic: dict[str, dict[str, DynamicEmbParameterSharding]]) -> ShardingPlan:
        for path, entries in dynamic.items():
            module_plan = static.plan.get(path)
            if module_plan is None:
                module_plan = static.plan[path] = EmbeddingModuleShardingPlan()
            module_plan.update(entries)  # type: ignore[attr-defined]
        return static

    # --- public API -----------------------------------------------------------------------------
    def plan(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> ShardingPlan:
        """The sharding plan of ``module`` (dynamic tables row-wise; the rest by TorchRec's search)."""
        dynamic, storage = self._plan_dynamic(module, sharders)
        return self._merge(self._plan_static(module, sharders, storage), dynamic)

    def collective_plan(
        self,
        module: nn.Module,
        sharders: list[ModuleSharder[nn.Module]] | None = None,
        pg: dist.ProcessGroup | None = None,
    ) -> ShardingPlan:
        """:meth:`plan` with TorchRec's search run on rank 0 of ``pg`` and broadcast; the dynamic
        tables' entries are computed on every rank (they are deterministic and keep each rank's own
        ``dynamicemb_options`` objects, e.g. an ``external_storage``)."""
        if pg is None:
            if not dist.is_initialized():
                raise RuntimeError("collective_plan needs torch.distributed initialized (or use plan())")
            pg = dist.GroupMember.WORLD
        assert pg is not None
        if dist.get_world_size(pg) != self._topology.world_size:
            raise ValueError(
                f"the process group has {dist.get_world_size(pg)} ranks, the topology {self._topology.world_size}"
            )
        sharders = default_sharders() if sharders is None else sharders
        dynamic, storage = self._plan_dynamic(module, sharders)
        static = invoke_on_rank_and_broadcast_result(pg, 0, self._plan_static, module, sharders, storage)
        return self._merge(static, dynamic)
