"""Single-process checks of the pieces behind ``distribute``: constraints, conversion of standalone
dynamic collections, the CUDA-fbgemm guard, hashing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ParameterSharding, ShardingPlan

import gr_parallel
from dynamicemb import (
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbParameterConstraints,
    DynamicEmbTableOptions,
    PyDictStorage,
)
from dynamicemb.planner import DynamicEmbParameterSharding
from gr_parallel import sharding as sharding_module
from gr_parallel.constraints import is_data_parallel
from gr_parallel.dynamic_conversion import convert_dynamic_modules, optimizer_fused_params


def _config(name: str, rows: int = 64) -> EmbeddingConfig:
    return EmbeddingConfig(name=name, embedding_dim=4, num_embeddings=rows, feature_names=[f"f_{name}"])


class Layout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model_parallel = EmbeddingCollection(tables=[_config("a"), _config("b")])
        self.data_parallel = EmbeddingCollection(tables=[_config("c")])
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAMW, learning_rate=0.3, weight_decay=0.1)
        options = DynamicEmbTableOptions(max_capacity=1000, init_capacity=300)
        self.dynamic = nn.ModuleDict(
            {"d": DynamicEmbeddingCollection(tables=[_config("d", 1000)], table_options=options, optimizer=adam)}
        )


def test_layout_constraints_mark_model_and_data_parallel_children() -> None:
    constraints = gr_parallel.sharded_embedding_constraints(Layout())
    assert sorted(constraints) == ["a", "b", "c"]
    assert constraints["a"].sharding_types == ["row_wise"]
    assert is_data_parallel(constraints["c"]) and not is_data_parallel(constraints["a"])
    with pytest.raises(ValueError, match="mixes 'data_parallel'"):
        is_data_parallel(ParameterConstraints(sharding_types=["data_parallel", "row_wise"]))
    with pytest.raises(ValueError, match="cannot list 'data_parallel'"):
        gr_parallel.model_parallel_constraint(["row_wise", "data_parallel"])


def test_standalone_dynamic_collection_becomes_a_torchrec_twin_with_its_options_per_shard() -> None:
    model = Layout()
    converted = convert_dynamic_modules(model, world_size=4, user_constraints={})
    twin = model.dynamic["d"]
    assert type(twin) is EmbeddingCollection and twin.embedding_configs()[0].name == "d"
    assert next(twin.parameters()).device.type == "meta"
    options = converted.constraints["d"].dynamicemb_options
    assert (options.max_capacity, options.init_capacity) == (250, 75)  # whole-table capacities over 4 ranks
    fused = converted.fused_params_by_module["dynamic.d"]
    assert DynamicEmbOptimizerArgs.from_fused_params(fused).optimizer is DynamicEmbOptimizerType.ADAMW
    assert fused["learning_rate"] == 0.3


def test_standalone_dynamic_bag_collection_becomes_an_embedding_bag_collection() -> None:
    bag = EmbeddingBagConfig(name="bag", embedding_dim=4, num_embeddings=64, feature_names=["f_bag"])
    model = nn.ModuleDict({"bags": DynamicEmbeddingBagCollection(tables=[bag], is_weighted=True)})
    converted = convert_dynamic_modules(model, world_size=2, user_constraints={})
    twin = model["bags"]
    assert type(twin) is EmbeddingBagCollection and twin.is_weighted()
    assert twin.embedding_bag_configs()[0].name == "bag" and "bag" in converted.constraints
    assert converted.fused_params_by_module["bags"]["optimizer"] == "SGD"


def test_a_user_constraint_on_a_standalone_table_must_be_dynamic() -> None:
    given = DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=DynamicEmbTableOptions())
    assert convert_dynamic_modules(Layout(), 2, {"d": given}).constraints["d"] is given
    with pytest.raises(ValueError, match="must be a DynamicEmbParameterConstraints"):
        convert_dynamic_modules(Layout(), 2, {"d": gr_parallel.model_parallel_constraint()})


def test_conversion_refuses_filled_tables_and_a_dynamic_root() -> None:
    model = Layout()
    model.dynamic["d"](KeyedJaggedTensor(keys=["f_d"], values=torch.tensor([5]), lengths=torch.tensor([1])))
    with pytest.raises(ValueError, match="already hold rows"):
        convert_dynamic_modules(model, 2, {})
    with pytest.raises(TypeError, match="pass the module that holds it"):
        convert_dynamic_modules(DynamicEmbeddingCollection(tables=[_config("x")]), 2, {})


def test_optimizer_without_fused_params_equivalent_is_refused() -> None:
    args = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAGRAD, initial_accumulator_value=0.5)
    with pytest.raises(ValueError, match="cannot be expressed"):
        optimizer_fused_params(args)


def test_static_tables_on_cuda_need_fbgemm_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    static = ParameterSharding(sharding_type="row_wise", compute_kernel="fused", ranks=[0])
    dynamic = DynamicEmbParameterSharding(sharding_type="row_wise", compute_kernel="customized_kernel", ranks=[0])
    monkeypatch.setattr(sharding_module, "_fbgemm_has_cuda_kernels", lambda: False)
    cuda = torch.device("cuda", 0)
    sharding_module._check_static_tables_can_run(ShardingPlan({"m": {"dyn": dynamic}}), cuda)  # type: ignore[dict-item]
    sharding_module._check_static_tables_can_run(ShardingPlan({"m": {"a": static}}), torch.device("cpu"))  # type: ignore[dict-item]
    with pytest.raises(NotImplementedError, match=r"static tables \['a'\].*no CUDA kernels"):
        sharding_module._check_static_tables_can_run(ShardingPlan({"m": {"a": static, "dyn": dynamic}}), cuda)  # type: ignore[dict-item]


def test_stable_hash_depends_on_content_only() -> None:
    assert gr_parallel.stable_hash({"b": [1, 2], "a": "x"}) == gr_parallel.stable_hash({"a": "x", "b": [1, 2]})
    assert gr_parallel.stable_hash({"a": 1}) != gr_parallel.stable_hash({"a": 2})
    gr_parallel.check_same_across_ranks({"a": 1}, "anything")  # no process group: nothing to compare


def test_stable_hash_reads_dataclasses_by_field_and_ignores_memory_addresses() -> None:
    def dynamic(**options: object) -> DynamicEmbParameterConstraints:
        return DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=DynamicEmbTableOptions(**options))

    # a user's storage object prints its address, which differs between processes
    with_storage = [gr_parallel.stable_hash(dynamic(external_storage=PyDictStorage(8))) for _ in range(2)]
    assert with_storage[0] == with_storage[1]
    assert gr_parallel.stable_hash(dynamic(bucket_capacity=64)) != gr_parallel.stable_hash(dynamic())


def test_sharding_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="initialize_distributed"):
        gr_parallel.shard_embedding_modules(Layout())
