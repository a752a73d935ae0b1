"""Single-process pieces of the sharded path: key ownership, pooling, wire and output dtypes, plan entries."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.types import CommOp, ParameterSharding, ShardingType
from torchrec.modules.embedding_configs import PoolingType

from dynamicemb.distributed import owner_ranks
from dynamicemb.distributed.comm import comm_dtypes
from dynamicemb.distributed.common import output_dtype, split_parameter_shardings
from dynamicemb.distributed.embeddingbag import pool_bags
from dynamicemb.hash_index.layout import hash_keys
from dynamicemb.planner import DynamicEmbParameterSharding, KeyDistribution

INT64 = torch.iinfo(torch.int64)
SEQ = CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL.name


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    keys = torch.randint(INT64.min, INT64.max, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([keys, torch.tensor([INT64.min, INT64.max, -1, 0, 1])])


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_modulo_owner_is_the_non_negative_remainder(world_size: int) -> None:
    keys = _keys(1000)
    expected = torch.tensor([k % world_size for k in keys.tolist()])  # Python's floor remainder
    assert torch.equal(owner_ranks(keys, world_size, KeyDistribution.MODULO), expected)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_hash_owner_is_balanced_and_independent_of_the_bucket_bits(world_size: int) -> None:
    keys = torch.arange(200_000)
    owners = owner_ranks(keys, world_size, KeyDistribution.HASH)
    assert int(owners.min()) == 0 and int(owners.max()) == world_size - 1
    counts = torch.bincount(owners, minlength=world_size).float()
    assert float(counts.max() / counts.min()) < 1.05
    assert torch.equal(owners, owner_ranks(keys, world_size, KeyDistribution.HASH))  # deterministic
    buckets = hash_keys(keys[owners == 0]) & 255  # the shard's table hashes keys into buckets this way
    per_bucket = torch.bincount(buckets, minlength=256).float()
    assert float(per_bucket.min()) > 0.6 * float(per_bucket.mean()), "rank-0 keys crowd some buckets"


def test_hash_owner_handles_int64_extremes() -> None:
    owners = owner_ranks(_keys(10), 3, KeyDistribution.HASH)
    assert bool(((owners >= 0) & (owners < 3)).all())


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_pool_bags_matches_embedding_bag(pooling: PoolingType, weighted: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([2, 0, 3, 1, 0])
    rows = torch.randn(10, 6, generator=generator)
    ids = torch.randint(0, 10, (int(lengths.sum()),), generator=generator)
    weights = torch.rand(ids.numel(), generator=generator) if weighted else None
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    mode = "sum" if pooling == PoolingType.SUM or weighted else "mean"
    expected = torch.nn.functional.embedding_bag(ids, rows, offsets, mode=mode, per_sample_weights=weights)
    if weighted and pooling == PoolingType.MEAN:
        expected = expected / lengths.clamp(min=1).unsqueeze(1)
    torch.testing.assert_close(pool_bags(rows[ids], lengths, weights, pooling), expected)


def test_wire_dtypes_from_a_qcomm_registry() -> None:
    assert comm_dtypes(None, SEQ) == (None, None)
    registry = get_qcomm_codecs_registry(
        QCommsConfig(forward_precision=CommType.FP16, backward_precision=CommType.BF16)
    )
    assert comm_dtypes(registry, SEQ) == (torch.float16, torch.bfloat16)
    assert comm_dtypes(registry, "SOMETHING_ELSE") == (None, None)
    fp8 = get_qcomm_codecs_registry(QCommsConfig(forward_precision=CommType.FP8, backward_precision=CommType.FP32))
    with pytest.raises(NotImplementedError, match="float32, float16 or bfloat16"):
        comm_dtypes(fp8, SEQ)


def test_output_dtype_from_fused_params() -> None:
    assert output_dtype(None) == torch.float32
    assert output_dtype({"output_dtype": SparseType.FP16}) == torch.float16
    assert output_dtype({"output_dtype": SparseType.BF16}) == torch.bfloat16
    with pytest.raises(ValueError, match="output_dtype"):
        output_dtype({"output_dtype": SparseType.INT8})


def test_split_parameter_shardings() -> None:
    ours = DynamicEmbParameterSharding(
        sharding_type=ShardingType.ROW_WISE.value, compute_kernel=EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
    )
    theirs = ParameterSharding(sharding_type=ShardingType.TABLE_WISE.value, compute_kernel="fused")
    assert split_parameter_shardings({"a": ours, "b": theirs}) == ({"a": ours}, {"b": theirs})
    foreign = ParameterSharding(
        sharding_type=ShardingType.ROW_WISE.value, compute_kernel=EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
    )
    with pytest.raises(TypeError, match="needs a DynamicEmbParameterSharding"):
        split_parameter_shardings({"c": foreign})
