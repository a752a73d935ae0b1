"""Multi-process scenarios of sharded dynamic tables (run by ``dynamicemb_sharded_harness``).

Each scenario runs on every rank of a 3-process gloo world and uses a subgroup of 1, 2 or 3 of
them; it raises on failure. References are computed on every rank with unsharded modules over the
global batch (the concatenation of every rank's batch) with the loss divided by the world size:
TorchRec divides embedding gradients by the world size (``comm_ops`` gradient division) and DDP
averages dense gradients, so that is the sharded models' objective.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)
from dynamicemb.distributed import (
    DynamicEmbeddingBagCollectionSharder,
    DynamicEmbeddingCollectionSharder,
    ShardedDynamicEmbeddingBagCollection,
    ShardedDynamicEmbeddingCollection,
    find_sharded_modules,
    owner_ranks,
)
from dynamicemb.distributed.checkpoint import (
    dump_sharded,
    get_sharded_score,
    incremental_dump_sharded,
    load_sharded,
    set_sharded_score,
)
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.planner import (
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbParameterConstraints,
    KeyDistribution,
)

DIM = 8
INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
HASH, MODULO = KeyDistribution.HASH, KeyDistribution.MODULO
CPU = torch.device("cpu")


@dataclass
class Env:
    """This rank, its compute device, and the groups of the first 1, 2, ... ranks of the world
    (``None`` where this rank is not a member)."""

    rank: int
    device: torch.device
    groups: dict[int, dist.ProcessGroup | None]
    folder: str

    @classmethod
    def create(cls, rank: int, folder: str, device: torch.device = CPU) -> Env:
        world_size = dist.get_world_size()
        groups: dict[int, dist.ProcessGroup | None] = {}
        for size in range(1, world_size):
            group = dist.new_group(list(range(size)))
            groups[size] = group if rank < size else None
        groups[world_size] = dist.group.WORLD
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
        dist.barrier()
        return cls(rank, device, groups, folder)


# --- building blocks --------------------------------------------------------------------------------
def bag_config(name: str, rows: int, features: list[str], pooling: PoolingType) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=features, pooling=pooling
    )


def dyadic(shape: tuple[int, ...], seed: int, scale: int = 16) -> torch.Tensor:
    """Random multiples of 1/scale in [-0.5, 0.5): sums and halvings of them are exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-scale // 2, scale // 2, shape, generator=generator).float() / scale


def make_kjt(features: list[str], bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    values = [k for f in features for bag in bags[f] for k in bag]
    lengths = [len(bag) for f in features for bag in bags[f]]
    return KeyedJaggedTensor(
        keys=list(features),
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def global_bags(per_rank: list[dict[str, list[list[int]]]], features: list[str]) -> dict[str, list[list[int]]]:
    return {f: [bag for bags in per_rank for bag in bags[f]] for f in features}


def random_bags(features: list[str], batch: int, seed: int, low: int, high: int) -> dict[str, list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    bags: dict[str, list[list[int]]] = {}
    for f in features:
        lengths = torch.randint(0, 4, (batch,), generator=generator).tolist()
        bags[f] = [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]
    return bags


def keys_owned_by(rank: int, world_size: int, distribution: KeyDistribution, count: int, start: int) -> list[int]:
    candidates = torch.arange(start, start + 64 * count * world_size)
    mine = candidates[owner_ranks(candidates, world_size, distribution) == rank]
    return mine[:count].tolist()


def shard(
    module: nn.Module,
    constraints: dict[str, ParameterConstraints],
    sharders: list[Any],
    group: dist.ProcessGroup,
    device: torch.device = CPU,
) -> DistributedModelParallel:
    """Plan with the dynamicemb planner over ``group`` and wrap ``module`` in DMP, as seed 004 does."""
    world_size = dist.get_world_size(group)
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device=device.type)
    planner = DynamicEmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        batch_size=8,
        enumerator=DynamicEmbeddingEnumerator(topology=topology, constraints=constraints),
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
        debug=False,
    )
    plan = planner.collective_plan(module, sharders, group)
    return DistributedModelParallel(module, env=subgroup_env(group), device=device, sharders=sharders, plan=plan)


def subgroup_env(group: dist.ProcessGroup) -> ShardingEnv:
    """``ShardingEnv.from_process_group`` for a group smaller than the world: TorchRec's
    constructor builds a device mesh, a collective of every rank of the world, which ranks outside
    ``group`` do not join; these scenarios need no device mesh."""
    env = ShardingEnv(dist.get_world_size(group), dist.get_rank(group), pg=None)
    env.process_group = group
    return env


def shards_of(model: nn.Module) -> dict[str, DynamicEmbeddingTable]:
    """This rank's shard of every dynamic table of ``model``, by table name."""
    return {name: t for m in find_sharded_modules(model).values() for name, t in m.dynamic_embedding_tables().items()}


def rows_of(table: DynamicEmbeddingTable) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (embedding, optimizer state) of every stored row."""
    rows = {}
    for keys, embeddings, state, _ in table.export():
        for k, e, s in zip(keys.tolist(), embeddings, state):
            rows[k] = (e.clone(), s.clone())
    return rows


def preload(
    table: DynamicEmbeddingTable,
    rows: dict[int, torch.Tensor],
    world_size: int,
    rank: int,
    distribution: KeyDistribution,
) -> None:
    """Store the rows of ``rows`` this rank owns (all of them with ``world_size`` 1)."""
    keys = torch.tensor(sorted(rows), dtype=torch.int64)
    mine = keys[owner_ranks(keys, world_size, distribution) == rank]
    if mine.numel():
        embeddings = torch.stack([rows[k] for k in mine.tolist()])
        table.import_rows(mine, embeddings, None, torch.zeros_like(mine))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(actual, expected), f"{what}: not bitwise equal, max diff {(actual - expected).abs().max()}"
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def assert_shards_match(
    shards: dict[str, DynamicEmbeddingTable],
    reference: dict[str, DynamicEmbeddingTable],
    group: dist.ProcessGroup,
    distributions: dict[str, KeyDistribution],
    exact: bool,
) -> None:
    """Every shard holds exactly the reference rows (embedding and optimizer state) of the keys it owns."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, shard_table in shards.items():
        expected = rows_of(reference[name])
        got = rows_of(shard_table)
        keys = torch.tensor(sorted(got), dtype=torch.int64)
        assert bool((owner_ranks(keys, world_size, distributions[name]) == rank).all()), (
            f"{name}: a key on the wrong rank"
        )
        for key, (embedding, state) in got.items():
            assert key in expected, f"{name}: key {key} is not in the reference"
            assert_close(embedding, expected[key][0], exact, f"{name} key {key} embedding")
            assert_close(state, expected[key][1], exact, f"{name} key {key} optimizer state")
        sizes: list[Any] = [None] * world_size
        dist.all_gather_object(sizes, len(got), group=group)
        assert sum(sizes) == len(expected), (
            f"{name}: {sum(sizes)} rows over the shards, {len(expected)} in the reference"
        )
        steps = [None] * world_size
        dist.all_gather_object(steps, shard_table.optimizer.step, group=group)
        assert set(steps) == {reference[name].optimizer.step}, (
            f"{name}: steps {steps} vs {reference[name].optimizer.step}"
        )


# --- equivalence with the unsharded collection --------------------------------------------------------
EC_FEATURES = ["f1", "f2", "f3"]


def ec_configs(num_embeddings: int = 512) -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=num_embeddings, feature_names=["f1", "f2"]),
        EmbeddingConfig(name="u", embedding_dim=DIM, num_embeddings=num_embeddings, feature_names=["f3"]),
    ]


def equivalence_batches(world_size: int, distribution: KeyDistribution) -> list[list[dict[str, list[list[int]]]]]:
    """Per step, per rank, the bags of every feature: ordinary ids; an empty feature, all-duplicate
    ids and a table no rank uses; int64 extremes and a table only one owner gets ids of."""
    steps = [[random_bags(EC_FEATURES, 3, 100 + r, -20, 40) for r in range(world_size)]]
    step = []
    for r in range(world_size):
        bags = random_bags(EC_FEATURES, 3, 200 + r, 0, 30)
        bags["f3"] = [[], [], []]
        if r == 0:
            bags["f2"] = [[], [], []]
        else:
            bags["f1"] = [[7, 7], [7], [7, 7, 7]]
        step.append(bags)
    steps.append(step)
    only_rank0 = keys_owned_by(0, world_size, distribution, 3, 1000)
    step = []
    for r in range(world_size):
        bags = random_bags(EC_FEATURES, 3, 300 + r, 0, 30)
        bags["f1"] = [[INT64_MIN, INT64_MAX], [-1, 0], [-(2**40), INT64_MAX, 5]]
        bags["f3"] = [[only_rank0[0]], [only_rank0[1], only_rank0[2]], []]
        step.append(bags)
    steps.append(step)
    steps.append([random_bags(EC_FEATURES, 3, 400 + r, -20, 40) for r in range(world_size)])
    return steps


def run_equivalence(
    env: Env,
    world_size: int,
    fused_params: dict[str, Any],
    distribution: KeyDistribution,
    dedup_variants: tuple[bool, ...],
    exact: bool,
    qcomm_codecs_registry: dict[str, Any] | None = None,
) -> None:
    group = env.groups.get(world_size)
    if group is None:
        return
    rank, device = dist.get_rank(group), env.device
    options = DynamicEmbTableOptions(
        initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.25)
    )
    initial = {k: dyadic((DIM,), seed=k + 50) for k in range(-20, 40, 2)}
    reference = DynamicEmbeddingCollection(
        ec_configs(), device=device, table_options=options, optimizer=fused_params, process_local=True
    )
    for table in reference.dynamic_embedding_tables().values():
        preload(table, initial, 1, 0, distribution)
    models = []
    for dedup in dedup_variants:
        constraints = {
            name: DynamicEmbParameterConstraints(
                sharding_types=[ShardingType.ROW_WISE.value],
                use_dynamicemb=True,
                dynamicemb_options=options,
                key_distribution=distribution,
            )
            for name in ("t", "u")
        }
        sharder = DynamicEmbeddingCollectionSharder(
            qcomm_codecs_registry=qcomm_codecs_registry, fused_params=fused_params, use_index_dedup=dedup
        )
        ec = EmbeddingCollection(tables=ec_configs(), device=torch.device("meta"))
        model = shard(ec, constraints, [sharder], group, device)
        for table in shards_of(model).values():
            preload(table, initial, world_size, rank, distribution)
        models.append(model)
    for step, per_rank in enumerate(equivalence_batches(world_size, distribution)):
        full = global_bags(per_rank, EC_FEATURES)
        expected = reference(make_kjt(EC_FEATURES, full))
        loss = torch.zeros((), device=device)
        mine: dict[str, slice] = {}
        weights: dict[str, torch.Tensor] = {}
        for i, f in enumerate(EC_FEATURES):
            sizes = [sum(len(bag) for bag in bags[f]) for bags in per_rank]
            start = sum(sizes[:rank])
            mine[f] = slice(start, start + sizes[rank])
            weights[f] = dyadic((sum(sizes), DIM), seed=1000 * step + i, scale=4).to(device)
            loss = loss + (expected[f].values() * weights[f]).sum()
        (loss / world_size).backward()
        for model in models:
            out = model(make_kjt(EC_FEATURES, per_rank[rank]))
            local_loss = torch.zeros((), device=device)
            for f in EC_FEATURES:
                assert_close(out[f].values(), expected[f].values()[mine[f]].detach(), exact, f"step {step} {f}")
                assert out[f].lengths().cpu().tolist() == [len(b) for b in per_rank[rank][f]]
                local_loss = local_loss + (out[f].values() * weights[f][mine[f]]).sum()
            local_loss.backward()
    distributions = {"t": distribution, "u": distribution}
    for model in models:
        assert_shards_match(shards_of(model), reference.dynamic_embedding_tables(), group, distributions, exact)


SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}
ADAM = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6, "weight_decay": 0.01}


def equivalence_sgd_dedup_on_off_two_ranks(env: Env) -> None:
    """Dyadic rows, weights and learning rate: sharded == unsharded bitwise, with dedup on and off."""
    run_equivalence(env, 2, SGD, HASH, (True, False), exact=True)


def equivalence_adam_modulo_two_ranks(env: Env) -> None:
    run_equivalence(env, 2, ADAM, MODULO, (True, False), exact=False)


def equivalence_adam_hash_three_ranks(env: Env) -> None:
    run_equivalence(env, 3, ADAM, HASH, (True,), exact=False)


def equivalence_rowwise_adagrad_one_rank(env: Env) -> None:
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-6}
    run_equivalence(env, 1, fused, HASH, (True,), exact=False)


def fp16_wire_two_ranks(env: Env) -> None:
    """A FP16 qcomm codec sends embeddings and gradients as float16: results within fp16 precision."""
    group = env.groups.get(2)
    if group is None:
        return
    registry = get_qcomm_codecs_registry(
        QCommsConfig(forward_precision=CommType.FP16, backward_precision=CommType.FP16)
    )
    sharder = DynamicEmbeddingCollectionSharder(qcomm_codecs_registry=registry, fused_params=SGD)
    constraints = {n: DynamicEmbParameterConstraints(use_dynamicemb=True) for n in ("t", "u")}
    model = shard(
        EmbeddingCollection(tables=ec_configs(), device=torch.device("meta")), constraints, [sharder], group, env.device
    )
    rank = dist.get_rank(group)
    initial = {k: torch.randn(DIM, generator=torch.Generator().manual_seed(k + 7)) for k in range(30)}
    for table in shards_of(model).values():
        preload(table, initial, 2, rank, HASH)
    bags = random_bags(EC_FEATURES, 4, 10 + rank, 0, 30)
    out = model(make_kjt(EC_FEATURES, bags))
    for f, jt in out.items():
        ids = [k for bag in bags[f] for k in bag]
        expected = torch.stack([initial[k] for k in ids]) if ids else torch.zeros(0, DIM)
        got = jt.values().detach().cpu()
        assert torch.equal(got, expected.half().float()), f"{f}: not the rows rounded to float16 once"
    sum(jt.values().sum() for jt in out.values()).backward()


def weighted_bags_two_ranks(env: Env) -> None:
    """A weighted EmbeddingBagCollection of dynamic tables (SUM and MEAN) == the unsharded one."""
    group = env.groups.get(2)
    if group is None:
        return
    rank, world_size, device = dist.get_rank(group), 2, env.device
    configs = [
        bag_config("p", 256, ["a", "b"], PoolingType.SUM),
        bag_config("q", 256, ["c"], PoolingType.MEAN),
    ]
    features = ["a", "b", "c"]
    initial = {k: dyadic((DIM,), seed=k + 3) for k in range(-10, 30)}
    reference = DynamicEmbeddingBagCollection(
        configs, is_weighted=True, device=device, optimizer=ADAM, process_local=True
    )
    for table in reference.dynamic_embedding_tables().values():
        preload(table, initial, 1, 0, HASH)
    constraints = {n: DynamicEmbParameterConstraints(use_dynamicemb=True) for n in ("p", "q")}
    sharder = DynamicEmbeddingBagCollectionSharder(fused_params=ADAM, use_index_dedup=True)
    ebc = EmbeddingBagCollection(tables=configs, is_weighted=True, device=torch.device("meta"))
    model = shard(ebc, constraints, [sharder], group, device)
    for table in shards_of(model).values():
        preload(table, initial, world_size, rank, HASH)

    def weighted(bags: dict[str, list[list[int]]], seed: int) -> KeyedJaggedTensor:
        kjt = make_kjt(features, bags)
        weights = dyadic((kjt.values().numel(),), seed=seed, scale=8) + 1.0
        return KeyedJaggedTensor(keys=features, values=kjt.values(), lengths=kjt.lengths(), weights=weights)

    for step in range(3):
        per_rank = [random_bags(features, 3, 60 * step + r, -10, 30) for r in range(world_size)]
        local = weighted(per_rank[rank], seed=step * 10 + rank)
        parts = [weighted(per_rank[r], seed=step * 10 + r) for r in range(world_size)]
        full = make_kjt(features, global_bags(per_rank, features))
        weights = torch.cat(
            [
                torch.cat([p.weights()[p.offset_per_key()[i] : p.offset_per_key()[i + 1]] for p in parts])
                for i in range(3)
            ]
        )
        full = KeyedJaggedTensor(keys=features, values=full.values(), lengths=full.lengths(), weights=weights)
        expected = reference(full).values()
        head = dyadic(tuple(expected.shape), seed=step, scale=4).to(device)
        ((expected * head).sum() / world_size).backward()
        out = model(local).values()
        torch.testing.assert_close(out, expected[3 * rank : 3 * rank + 3].detach(), rtol=1e-5, atol=1e-6)
        (out * head[3 * rank : 3 * rank + 3]).sum().backward()
    assert_shards_match(
        shards_of(model), reference.dynamic_embedding_tables(), group, {"p": HASH, "q": HASH}, exact=False
    )


# --- equivalence with TorchRec's static row-wise table ----------------------------------------------------
def static_rows(model: nn.Module, key: str) -> list[tuple[int, torch.Tensor]]:
    """(row offset, local rows) of every local shard of state dict entry ``key``."""
    value = model.state_dict()[key]
    if hasattr(value, "local_shards"):
        return [(s.metadata.shard_offsets[0], s.tensor) for s in value.local_shards()]
    return [(0, value)]


def set_static_rows(model: nn.Module, key: str, rows: torch.Tensor) -> None:
    for offset, tensor in static_rows(model, key):
        with torch.no_grad():
            tensor.copy_(rows[offset : offset + tensor.shape[0]])


def torchrec_static_equivalence(env: Env) -> None:
    """A dynamic table == TorchRec's fused row-wise table (fbgemm CPU TBE) with the same initial
    rows and optimizer, with no eviction: same outputs at every step and same rows after."""
    group = env.groups.get(2)
    if group is None:
        return
    rank = dist.get_rank(group)
    rows = 64
    config = [EmbeddingConfig(name="s", embedding_dim=DIM, num_embeddings=rows, feature_names=["a"])]
    initial = dyadic((rows, DIM), seed=5)
    optimizers = [
        {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.25},
        {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
        {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
    ]
    for fused in optimizers:
        static = shard(
            EmbeddingCollection(tables=config, device=torch.device("meta")),
            {"s": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])},
            [DynamicEmbeddingCollectionSharder(fused_params=fused)],
            group,
        )
        set_static_rows(static, "embeddings.s.weight", initial)
        dynamic = shard(
            EmbeddingCollection(tables=config, device=torch.device("meta")),
            {"s": DynamicEmbParameterConstraints(use_dynamicemb=True, key_distribution=MODULO)},
            [DynamicEmbeddingCollectionSharder(fused_params=fused, use_index_dedup=True)],
            group,
        )
        assert isinstance(find_sharded_modules(dynamic)["_root"], ShardedDynamicEmbeddingCollection)
        preload(shards_of(dynamic)["s"], dict(enumerate(initial)), 2, rank, MODULO)
        for step in range(3):
            bags = random_bags(["a"], 4, 30 * step + rank, 0, rows)
            kjt = make_kjt(["a"], bags)
            ours, theirs = dynamic(kjt)["a"].values(), static(kjt)["a"].values()
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            weights = dyadic(tuple(ours.shape), seed=step + 3, scale=4)
            (ours * weights).sum().backward()
            (theirs * weights).sum().backward()
        every_key = make_kjt(["a"], {"a": [list(range(rows))]})
        dynamic.eval()
        static.eval()
        with torch.no_grad():
            torch.testing.assert_close(
                dynamic(every_key)["a"].values(), static(every_key)["a"].values(), rtol=1e-5, atol=1e-6
            )


# --- a mixed model: dynamic and ordinary tables in one DMP, dense optimizer for the rest ------------------
MIXED_FEATURES = ["x", "y", "z", "w"]
SEQ_FEATURES = ["x", "y", "z"]
POOLED_FEATURES = ["x", "y", "w"]


def mixed_configs() -> tuple[list[EmbeddingConfig], list[EmbeddingBagConfig]]:
    """TorchRec 1.8 on CPU cannot shard a sequence table data-parallel nor a pooled table row-wise,
    so the data-parallel table is pooled and the row-wise one sequence."""
    ec = [
        EmbeddingConfig(name="dyn", embedding_dim=DIM, num_embeddings=256, feature_names=["x"]),
        EmbeddingConfig(name="rw", embedding_dim=DIM, num_embeddings=32, feature_names=["y"]),
        EmbeddingConfig(name="tw", embedding_dim=DIM, num_embeddings=32, feature_names=["z"]),
    ]
    ebc = [
        bag_config("bag_dyn", 256, ["x"], PoolingType.MEAN),
        bag_config("bag_tw", 32, ["y"], PoolingType.SUM),
        bag_config("bag_dp", 32, ["w"], PoolingType.SUM),
    ]
    return ec, ebc


class MixedModel(nn.Module):
    """Sequence and pooled embeddings into two small dense layers; ``ec`` / ``ebc`` are any
    modules mapping the KJT to ``Dict[str, JaggedTensor]`` / a ``KeyedTensor``."""

    def __init__(self, ec: nn.Module, ebc: nn.Module) -> None:
        super().__init__()
        self.ec = ec
        self.ebc = ebc
        self.seq_head = nn.Linear(DIM, 1)
        self.pool_head = nn.Linear(len(POOLED_FEATURES) * DIM, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seq = self.ec(kjt)
        pooled = self.ebc(kjt)
        seq_values = {f: seq[f].values() for f in SEQ_FEATURES}
        seq_loss = sum(self.seq_head(v).square().sum() for v in seq_values.values())
        pooled_loss = self.pool_head(pooled.values()).square().sum()
        return seq_loss + pooled_loss, {**seq_values, "pooled": pooled.values()}


class _Merged(nn.Module):
    """The reference's collections: an unsharded TorchRec module and a dynamic one side by side."""

    def __init__(self, static: nn.Module, dynamic: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.static, self.dynamic, self.pooled = static, dynamic, pooled

    def forward(self, kjt: KeyedJaggedTensor) -> Any:
        a, b = self.static(kjt), self.dynamic(kjt)
        if not self.pooled:
            return {**a, **b}
        from torchrec.sparse.jagged_tensor import KeyedTensor

        merged = {**b.to_dict(), **a.to_dict()}
        values = torch.cat([merged[f] for f in POOLED_FEATURES], 1)
        return KeyedTensor(keys=POOLED_FEATURES, length_per_key=[DIM] * len(POOLED_FEATURES), values=values)


def mixed_model_matches_unsharded_reference(env: Env) -> None:
    """One DMP holding dynamic tables (EC and EBC) beside static row-wise, table-wise and
    data-parallel tables and two dense layers, trained with a dense SGD: equal to the unsharded
    model trained on the global batch, step after step."""
    group = env.groups.get(2)
    if group is None:
        return
    rank, world_size = dist.get_rank(group), 2
    lr = 0.125
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr}
    ec_cfg, ebc_cfg = mixed_configs()
    torch.manual_seed(0)
    dense_init = MixedModel(nn.Identity(), nn.Identity())
    static_rows_init = {c.name: dyadic((c.num_embeddings, DIM), seed=len(c.name)) for c in ec_cfg + ebc_cfg}
    dyn_init = {k: dyadic((DIM,), seed=k + 900) for k in range(-8, 24)}

    constraints = {
        "dyn": DynamicEmbParameterConstraints(use_dynamicemb=True, key_distribution=HASH),
        "rw": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]),
        "tw": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
        "bag_dyn": DynamicEmbParameterConstraints(use_dynamicemb=True, key_distribution=MODULO),
        "bag_tw": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
        "bag_dp": ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value]),
    }
    sharded = MixedModel(
        EmbeddingCollection(tables=ec_cfg, device=torch.device("meta")),
        EmbeddingBagCollection(tables=ebc_cfg, device=torch.device("meta")),
    )
    sharded.load_state_dict(dense_init.state_dict(), strict=False)
    sharders = [
        DynamicEmbeddingCollectionSharder(fused_params=fused, use_index_dedup=True),
        DynamicEmbeddingBagCollectionSharder(fused_params=fused, use_index_dedup=True),
    ]
    dmp = shard(sharded, constraints, sharders, group)
    assert isinstance(dmp.module.ec, ShardedDynamicEmbeddingCollection)
    assert isinstance(dmp.module.ebc, ShardedDynamicEmbeddingBagCollection)
    state_keys = set(dmp.state_dict())
    static_keys = ["ec.embeddings.rw.weight", "ec.embeddings.tw.weight"]
    static_keys += ["ebc.embedding_bags.bag_tw.weight", "ebc.embedding_bags.bag_dp.weight"]
    for key in static_keys:
        assert key in state_keys, f"{key} missing from the state dict keys {sorted(state_keys)}"
        name = key.split(".")[-2]
        set_static_rows(dmp, key, static_rows_init[name])
    for name, table in shards_of(dmp).items():
        preload(table, dyn_init, world_size, rank, constraints[name].key_distribution)  # type: ignore[attr-defined]
    dense_optimizer = torch.optim.SGD(dmp.parameters(), lr=lr)

    static_ec = EmbeddingCollection(tables=[c for c in ec_cfg if c.name != "dyn"], device=CPU)
    static_ebc = EmbeddingBagCollection(tables=[c for c in ebc_cfg if c.name != "bag_dyn"], device=CPU)
    with torch.no_grad():
        for name, module in list(static_ec.embeddings.items()) + list(static_ebc.embedding_bags.items()):
            module.weight.copy_(static_rows_init[name])
    dyn_ec = DynamicEmbeddingCollection([ec_cfg[0]], device=CPU, optimizer=fused, process_local=True)
    dyn_ebc = DynamicEmbeddingBagCollection([ebc_cfg[0]], device=CPU, optimizer=fused, process_local=True)
    preload(dyn_ec.dynamic_embedding_tables()["dyn"], dyn_init, 1, 0, HASH)
    preload(dyn_ebc.dynamic_embedding_tables()["bag_dyn"], dyn_init, 1, 0, HASH)
    reference = MixedModel(_Merged(static_ec, dyn_ec, pooled=False), _Merged(static_ebc, dyn_ebc, pooled=True))
    reference.load_state_dict(dense_init.state_dict(), strict=False)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=lr)

    for step in range(3):
        per_rank = [random_bags(MIXED_FEATURES, 3, 77 * step + r, -8, 24) for r in range(world_size)]
        for bags in per_rank:
            for f in ("y", "z", "w"):
                bags[f] = [[abs(k) % 32 for k in bag] for bag in bags[f]]
        full = global_bags(per_rank, MIXED_FEATURES)
        ref_loss, ref_out = reference(make_kjt(MIXED_FEATURES, full))
        reference_optimizer.zero_grad()
        (ref_loss / world_size).backward()
        reference_optimizer.step()
        loss, out = dmp(make_kjt(MIXED_FEATURES, per_rank[rank]))
        dense_optimizer.zero_grad()
        loss.backward()
        dense_optimizer.step()
        for f in SEQ_FEATURES:
            sizes = [sum(len(b) for b in bags[f]) for bags in per_rank]
            start = sum(sizes[:rank])
            torch.testing.assert_close(out[f], ref_out[f][start : start + sizes[rank]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["pooled"], ref_out["pooled"][3 * rank : 3 * rank + 3], rtol=1e-5, atol=1e-6)
    for name in ("seq_head", "pool_head"):
        torch.testing.assert_close(
            getattr(dmp.module, name).weight, getattr(reference, name).weight, rtol=1e-5, atol=1e-6
        )


# --- dump / load across world sizes and key distributions --------------------------------------------------
DUMP_CONFIGS = [
    EmbeddingConfig(name="h", embedding_dim=4, num_embeddings=512, feature_names=["fh"]),
    EmbeddingConfig(name="m", embedding_dim=4, num_embeddings=512, feature_names=["fm"]),
]
DUMP_ADAM = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01}


def dump_model(group: dist.ProcessGroup, distributions: dict[str, KeyDistribution]) -> DistributedModelParallel:
    constraints = {
        name: DynamicEmbParameterConstraints(use_dynamicemb=True, key_distribution=d)
        for name, d in distributions.items()
    }
    sharder = DynamicEmbeddingCollectionSharder(fused_params=DUMP_ADAM, use_index_dedup=True)
    return shard(EmbeddingCollection(tables=DUMP_CONFIGS, device=torch.device("meta")), constraints, [sharder], group)


def train(model: nn.Module, seed: int, low: int = -300, high: int = 300) -> None:
    bags = random_bags(["fh", "fm"], 6, seed, low, high)
    out = model(make_kjt(["fh", "fm"], bags))
    sum(jt.values().sum() for jt in out.values()).backward()


def gather_rows(model: nn.Module) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Every rank's rows of every table of ``model`` (collective over the world; ranks not in
    the model's group contribute nothing)."""
    mine = {name: rows_of(t) for name, t in shards_of(model).items()} if model is not None else {}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for part in everyone:
        for name, rows in part.items():
            merged.setdefault(name, {}).update(rows)
    return merged


def assert_holds(model: nn.Module, expected: dict[str, dict[int, Any]], group: dist.ProcessGroup, what: str) -> None:
    """Each rank holds exactly the expected rows it owns; the shards together hold all of them."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    module = next(iter(find_sharded_modules(model).values()))
    for name, table in shards_of(model).items():
        got = rows_of(table)
        keys = torch.tensor(sorted(expected[name]), dtype=torch.int64)
        owned = keys[owner_ranks(keys, world_size, module.key_distributions()[name]) == rank].tolist()
        assert sorted(got) == owned, f"{what}: table {name} holds {len(got)} keys, owns {len(owned)} of the dump"
        for key in owned:
            assert torch.equal(got[key][0], expected[name][key][0]), f"{what}: {name} key {key} embedding"
            assert torch.equal(got[key][1], expected[name][key][1]), f"{what}: {name} key {key} optimizer state"


def dump_and_load_across_world_sizes(env: Env) -> None:
    """2 -> 1, 1 -> 2, 2 -> 3 (each with HASH and MODULO, and across them), an unsharded dump into a
    sharded model, a corrupt shard, a second dump replacing the first, an incremental dump."""
    g1, g2, g3 = env.groups[1], env.groups[2], env.groups[3]
    d2, d1, single, bad = (os.path.join(env.folder, n) for n in ("d2", "d1", "single", "bad"))
    assert g3 is not None
    model2 = None
    if g2 is not None:
        model2 = dump_model(g2, {"h": HASH, "m": MODULO})
        for step in range(2):
            train(model2, seed=10 * step + env.rank)
        dump_sharded(d2, model2, optim=True)
    reference = gather_rows(model2)
    steps: list[Any] = [None] * 3
    dist.all_gather_object(steps, {n: t.optimizer.step for n, t in shards_of(model2).items()} if model2 else None)
    assert len(reference["h"]) > 20 and len(reference["m"]) > 20

    if g1 is not None:  # 2 -> 1
        model1 = dump_model(g1, {"h": HASH, "m": MODULO})
        load_sharded(d2, model1, optim=True)
        assert_holds(model1, reference, g1, "2 -> 1")
        assert {n: t.optimizer.step for n, t in shards_of(model1).items()} == steps[0]
        dump_sharded(d1, model1, optim=True)
        standalone = DynamicEmbeddingCollection(DUMP_CONFIGS, device=CPU, optimizer=DUMP_ADAM, process_local=True)
        for name, table in standalone.dynamic_embedding_tables().items():
            rows = reference[name]
            keys = torch.tensor(sorted(rows), dtype=torch.int64)
            table.import_rows(
                keys,
                torch.stack([rows[k][0] for k in keys.tolist()]),
                torch.stack([rows[k][1] for k in keys.tolist()]),
                torch.zeros_like(keys),
            )
        DynamicEmbDump(single, standalone, optim=True)
    dist.barrier()

    model3 = dump_model(g3, {"h": MODULO, "m": HASH})  # 2 -> 3, across distributions
    load_sharded(d2, model3, optim=True)
    assert_holds(model3, reference, g3, "2 -> 3")

    if g2 is not None:
        model2b = dump_model(g2, {"h": MODULO, "m": HASH})  # 1 -> 2
        load_sharded(d1, model2b, optim=True)
        assert_holds(model2b, reference, g2, "1 -> 2")
        model2c = dump_model(g2, {"h": HASH, "m": HASH})  # an unsharded dump into a sharded model
        load_sharded(os.path.join(single, ""), model2c, optim=True)
        assert_holds(model2c, reference, g2, "unsharded -> 2")

        if env.rank == 0:
            shutil.copytree(d2, bad)
            victim = next(
                n for n in sorted(os.listdir(os.path.join(bad, "_root"))) if n.startswith("h.") and "shard-1" in n
            )
            with open(os.path.join(bad, "_root", victim), "r+b") as f:
                f.seek(20)
                f.write(b"\xff\xfe\xfd")
        dist.barrier(group=g2)
        fresh = dump_model(g2, {"h": HASH, "m": MODULO})
        try:
            load_sharded(bad, fresh, optim=True)
        except RuntimeError as error:
            assert "checksum" in str(error) and "shard-1" in str(error), str(error)
        else:
            raise AssertionError("a corrupt shard loaded")
        assert all(t.size() == 0 for t in shards_of(fresh).values()), (
            "a table changed before the corrupt file was found"
        )

        assert model2 is not None  # a second dump replaces the first: new files, old ones deleted
        old_files = set(os.listdir(os.path.join(d2, "_root")))
        train(model2, seed=99 + env.rank)
        dump_sharded(d2, model2, optim=True)
        new_files = set(os.listdir(os.path.join(d2, "_root")))
        assert len(new_files) == 5 and not (old_files - {"sharded_manifest.json"}) & new_files, (old_files, new_files)
        updated = gather_rows_in(model2, g2)
        reloaded = dump_model(g2, {"h": HASH, "m": MODULO})
        load_sharded(d2, reloaded, optim=True)
        assert_holds(reloaded, updated, g2, "second dump")

        thresholds = get_sharded_score(model2)  # incremental dump: the rows touched since
        assert thresholds is not None
        touched = {"fh": [[1000 + env.rank, 5], [7]], "fm": [[2000], [8, 9 + env.rank]]}
        out = model2(make_kjt(["fh", "fm"], touched))
        sum(jt.values().sum() for jt in out.values()).backward()
        rows, _ = incremental_dump_sharded(model2, thresholds["_root"]["h"])
        all_touched = {"h": {1000, 1001, 5, 7}, "m": {2000, 8, 9, 10}}
        module = find_sharded_modules(model2)["_root"]
        for name, (keys, embeddings) in rows["_root"].items():
            distribution = module.key_distributions()[name]
            candidates = torch.tensor(sorted(all_touched[name]))
            expected = set(candidates[owner_ranks(candidates, 2, distribution) == env.rank].tolist())
            assert set(keys.tolist()) == expected, (name, keys.tolist(), expected)
            assert embeddings.shape == (len(expected), 4)


def gather_rows_in(
    model: nn.Module, group: dist.ProcessGroup
) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    mine = {name: rows_of(t) for name, t in shards_of(model).items()}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    merged: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for part in everyone:
        for name, rows in part.items():
            merged.setdefault(name, {}).update(rows)
    return merged


def plan_for_another_world_size_is_refused(env: Env) -> None:
    g3 = env.groups[3]
    assert g3 is not None
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    constraints = {"h": DynamicEmbParameterConstraints(use_dynamicemb=True)}
    planner = DynamicEmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        enumerator=DynamicEmbeddingEnumerator(topology=topology, constraints=constraints),
    )
    module = EmbeddingCollection(tables=DUMP_CONFIGS, device=torch.device("meta"))
    try:
        planner.collective_plan(module, [DynamicEmbeddingCollectionSharder()], g3)
    except ValueError as error:
        assert "3 ranks" in str(error) and "topology 2" in str(error), str(error)
    else:
        raise AssertionError("a plan for 2 ranks was made over 3")
    plan = planner.plan(module, [DynamicEmbeddingCollectionSharder()])
    try:
        DistributedModelParallel(
            module, env=subgroup_env(g3), device=CPU, sharders=[DynamicEmbeddingCollectionSharder()], plan=plan
        )
    except ValueError as error:
        assert "plan shards it over ranks [0, 1]" in str(error), str(error)
    else:
        raise AssertionError("a plan for 2 ranks sharded a module over 3")


def custom_scores_one_rank(env: Env) -> None:
    """``set_sharded_score`` / ``get_sharded_score`` on the shards of CUSTOMIZED tables."""
    group = env.groups.get(1)
    if group is None:
        return
    options = DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    constraints = {
        n: DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=options) for n in ("h", "m")
    }
    sharder = DynamicEmbeddingCollectionSharder(fused_params=DUMP_ADAM)
    model = shard(EmbeddingCollection(tables=DUMP_CONFIGS, device=torch.device("meta")), constraints, [sharder], group)
    set_sharded_score(model, 7)
    set_sharded_score(model, {"_root": {"m": 9}})
    assert get_sharded_score(model) == {"_root": {"h": 7, "m": 9}}
    train(model, seed=1)
    for name, expected in (("h", 7), ("m", 9)):
        scores = torch.cat([part[3] for part in shards_of(model)[name].export()])
        assert scores.numel() > 0 and bool((scores == expected).all()), (name, scores.unique())


def admission_counters_survive_sharded_dump_and_load(env: Env) -> None:
    """Counts of keys seen but not yet admitted are dumped by every rank and loaded, 2 -> 1, by the rank
    that owns each key: after the load, one more sighting admits a key seen twice before."""
    from dynamicemb import FrequencyAdmissionStrategy

    g1, g2 = env.groups[1], env.groups[2]
    folder = os.path.join(env.folder, "admission")

    def model(group: dist.ProcessGroup) -> DistributedModelParallel:
        options = DynamicEmbTableOptions(admit_strategy=FrequencyAdmissionStrategy(threshold=3))
        constraints = {
            name: DynamicEmbParameterConstraints(use_dynamicemb=True, key_distribution=HASH, dynamicemb_options=options)
            for name in ("h", "m")
        }
        sharder = DynamicEmbeddingCollectionSharder(fused_params=DUMP_ADAM, use_index_dedup=True)
        collection = EmbeddingCollection(tables=DUMP_CONFIGS, device=torch.device("meta"))
        return shard(collection, constraints, [sharder], group)

    def counters(m: nn.Module) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        for name, table in shards_of(m).items():
            assert table.counter is not None, f"table {name} has no admission counter"
            out[name] = {int(k): int(c) for keys, counts in table.counter.dump() for k, c in zip(keys, counts)}
        return out

    before: dict[str, dict[int, int]] = {}
    if g2 is not None:
        source = model(g2)
        seen_twice = {"fh": [[100 + env.rank, 200 + env.rank]], "fm": [[300 + env.rank]]}
        for _ in range(2):  # every key twice: counted, below the threshold of 3
            source(make_kjt(["fh", "fm"], seen_twice))
        dump_sharded(folder, source, optim=True)
        mine = counters(source)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine if g2 is not None else None)
    for part in everyone:
        for name, counts in (part or {}).items():
            before.setdefault(name, {}).update(counts)
    assert before and all(count == 2 for counts in before.values() for count in counts.values()), before
    assert sorted(before["h"]) == [100, 101, 200, 201] and sorted(before["m"]) == [300, 301], before

    if g1 is not None:  # 2 -> 1
        target = model(g1)
        load_sharded(folder, target, optim=True)
        assert counters(target) == before, f"2 -> 1 counters {counters(target)} != {before}"
        target(make_kjt(["fh", "fm"], {"fh": [[100]], "fm": [[300]]}))  # the third sighting admits them
        stored = {name: set(rows_of(table)) for name, table in shards_of(target).items()}
        assert 100 in stored["h"] and 300 in stored["m"], stored
        assert 101 not in stored["h"], "a key seen twice is not admitted without a third sighting"
    dist.barrier()


# --- batches without ids, malformed batches -----------------------------------------------------------------
def _stored(model: nn.Module) -> dict[str, tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], int]]:
    return {name: (rows_of(table), table.optimizer.step) for name, table in shards_of(model).items()}


def _assert_unchanged(before: dict, after: dict, what: str) -> None:
    for name, (rows, step) in before.items():
        assert after[name][1] == step, f"{what}: table {name} step {step} -> {after[name][1]}"
        assert set(after[name][0]) == set(rows), f"{what}: table {name} keys changed"
        for key, (embedding, state) in rows.items():
            assert torch.equal(after[name][0][key][0], embedding) and torch.equal(after[name][0][key][1], state), (
                f"{what}: table {name} key {key} changed"
            )


def empty_and_malformed_batches_two_ranks(env: Env) -> None:
    """Sharded EC and EBC: a batch with no id on any rank gives outputs that require grad (as
    TorchRec's do) and whose backward changes no row and no step; a KJT whose lengths do not match
    its ids raises on every rank before any collective, and the next batch trains normally."""
    group = env.groups.get(2)
    if group is None:
        return
    rank, device, meta = dist.get_rank(group), env.device, torch.device("meta")
    constraints = {n: DynamicEmbParameterConstraints(use_dynamicemb=True) for n in ("t", "u")}
    bag_configs = [bag_config("t", 64, ["f1", "f2"], PoolingType.SUM), bag_config("u", 64, ["f3"], PoolingType.MEAN)]
    models = {
        "EC": shard(
            EmbeddingCollection(tables=ec_configs(64), device=meta),
            constraints,
            [DynamicEmbeddingCollectionSharder(fused_params=ADAM)],
            group,
            device,
        ),
        "EBC": shard(
            EmbeddingBagCollection(tables=bag_configs, device=meta),
            constraints,
            [DynamicEmbeddingBagCollectionSharder(fused_params=ADAM)],
            group,
            device,
        ),
    }
    some_ids = make_kjt(EC_FEATURES, {f: [[1, 2 + rank]] if rank == 0 else [[]] for f in EC_FEATURES})
    no_ids = make_kjt(EC_FEATURES, {f: [[], []] for f in EC_FEATURES})
    malformed = KeyedJaggedTensor(keys=EC_FEATURES, values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 1]))
    for kind, model in models.items():

        def outputs(features: KeyedJaggedTensor, model: nn.Module = model, kind: str = kind) -> list[torch.Tensor]:
            out = model(features)
            return [jt.values() for jt in out.values()] if kind == "EC" else [out.values()]

        sum(t.sum() for t in outputs(some_ids)).backward()
        before = _stored(model)
        empty = outputs(no_ids)
        assert all(t.requires_grad for t in empty), f"{kind}: an empty batch's outputs do not require grad"
        sum(t.sum() for t in empty).backward()
        _assert_unchanged(before, _stored(model), f"{kind} empty batch")
        try:
            outputs(malformed)
        except ValueError as error:
            assert "lengths sum to 3 but it holds 2 ids" in str(error), str(error)
        else:
            raise AssertionError(f"{kind}: a KJT whose lengths do not match its ids was accepted")
        _assert_unchanged(before, _stored(model), f"{kind} malformed batch")
        sum(t.sum() for t in outputs(some_ids)).backward()
        steps = {name: table.optimizer.step for name, table in shards_of(model).items()}
        assert steps == {"t": 2, "u": 2}, f"{kind}: steps after two batches with ids: {steps}"
    dist.barrier(group)


SCENARIOS = [
    "equivalence_sgd_dedup_on_off_two_ranks",
    "equivalence_adam_modulo_two_ranks",
    "equivalence_adam_hash_three_ranks",
    "equivalence_rowwise_adagrad_one_rank",
    "fp16_wire_two_ranks",
    "weighted_bags_two_ranks",
    "torchrec_static_equivalence",
    "mixed_model_matches_unsharded_reference",
    "dump_and_load_across_world_sizes",
    "plan_for_another_world_size_is_refused",
    "custom_scores_one_rank",
    "admission_counters_survive_sharded_dump_and_load",
    "empty_and_malformed_batches_two_ranks",
]
