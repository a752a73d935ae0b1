"""The calls of the seed-000 tutorial (packages/gr-models/examples/tutorial.py) at small sizes, for torchrun.

Usage: torchrun --nproc_per_node N tutorial_flow_worker.py OUT_DIR   (run in a scratch working directory)

Like the tutorial: initialize, build a RankingGR (two model-parallel static tables, a data-parallel table, a
dynamic table), forward and backward one batch, destroy the global state, then gr_checkpoint.save / load into
./checkpoint. Then the dense weights are zeroed and loaded back; rank r writes OUT_DIR/rank<r>.json with what it
saw.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

import gr_checkpoint
import gr_parallel.initialize as init
from dynamicemb import DynamicEmbEvictStrategy
from gr_models.configs import (
    DynamicShardedEmbeddingConfig,
    KernelBackend,
    RankingConfig,
    ShardedEmbeddingConfig,
    get_hstu_config,
)
from gr_models.data.utils import FeatureConfig, RankingBatch
from gr_models.model.ranking_gr import RankingGR
from gr_models.modules.embedding import EmbeddingOptimizerParam
from gr_models.utils.tensor_initializer import UniformInitializer


def exit_without_teardown() -> None:
    """Exit 0 now, skipping interpreter teardown: the script's last statement, after its report is written and its
    process groups destroyed. On the 2-core CI machine gloo workers aborted in teardown after a complete, correct run
    ("terminate called without an active exception", exit -6, inside torch's native teardown)."""
    if torch.distributed.is_initialized():
        raise RuntimeError("exit_without_teardown: the default process group is still up; destroy it first")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


init.initialize_distributed()
init.initialize_model_parallel()
init.set_random_seed(1234)

optimizer = EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=0.0001)
dim = 16


def static(feature: str, table: str, vocab: int, sharding_type: str) -> ShardedEmbeddingConfig:
    return ShardedEmbeddingConfig(
        feature_names=[feature], table_name=table, vocab_size=vocab, dim=dim, sharding_type=sharding_type,
        initializer=UniformInitializer(), optimizer_param=optimizer,
    )  # fmt: skip


emb_configs = [
    static("user_feat0", "user_table0", 50, "model_parallel"),
    static("user_feat1", "user_table1", 50, "model_parallel"),
    static("act_feat", "act", 10, "data_parallel"),
    DynamicShardedEmbeddingConfig(
        feature_names=["item_feat"], table_name="item", vocab_size=100, dim=dim, initializer=UniformInitializer(),
        optimizer_param=optimizer, global_hbm_for_values=0, evict_strategy=DynamicEmbEvictStrategy.LRU,
    ),
]  # fmt: skip
hstu_config = get_hstu_config(
    hidden_size=dim, kv_channels=8, num_attention_heads=2, num_layers=1, init_method=UniformInitializer(),
    dtype=torch.bfloat16, is_causal=True, kernel_backend=KernelBackend.PYTORCH,
)  # fmt: skip
task_config = RankingConfig(embedding_configs=emb_configs, prediction_head_arch=[[16, 4, 1] for _ in range(1)])
ranking_model_train = RankingGR(hstu_config=hstu_config, task_config=task_config)

batch = RankingBatch.random(
    batch_size=8,
    feature_configs=[
        FeatureConfig(feature_names=["user_feat0"], max_item_ids=[50], max_sequence_length=3, is_jagged=True),
        FeatureConfig(feature_names=["user_feat1"], max_item_ids=[50], max_sequence_length=3, is_jagged=True),
        FeatureConfig(["item_feat", "act_feat"], max_item_ids=[100, 10], max_sequence_length=12, is_jagged=True),
    ],
    item_feature_name="item_feat",
    contextual_feature_names=["user_feat0", "user_feat1"],
    action_feature_name="act_feat",
    max_num_candidates=3,
    device=torch.device("cpu"),
    num_tasks=1,
)
loss, _ = ranking_model_train(batch)
loss.sum().backward()

init.destroy_global_state()

save_path = "./checkpoint"
os.makedirs(save_path, exist_ok=True)
gr_checkpoint.save(save_path, ranking_model_train)
gr_checkpoint.load(save_path, ranking_model_train)

# beyond the tutorial: the load really restores the saved state
ranking_model_train.eval()
before, _ = ranking_model_train(batch)
with torch.no_grad():
    for parameter in ranking_model_train.dense_parameters():
        parameter.zero_()
zeroed, _ = ranking_model_train(batch)
gr_checkpoint.load(save_path, ranking_model_train)
after, _ = ranking_model_train(batch)

rank = int(os.environ.get("RANK", "0"))
report = {
    "world_size": ranking_model_train.distributed_world_size,
    "placement": ranking_model_train.embedding.table_placement(),
    "loss_finite": bool(torch.isfinite(loss).all()),
    "manifest_world_size": gr_checkpoint.read_manifest(Path(save_path)).world_size,
    "zeroing_changed_outputs": not torch.equal(zeroed, before),
    "load_restored_outputs": torch.equal(after, before),
}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(report))

# The model lives in reference cycles; while it is alive, destroy_global_state above deferred the teardown to the
# interpreter exit, which exit_without_teardown skips: free it, then tear down now.
del ranking_model_train
gc.collect()
init.destroy_global_state()
exit_without_teardown()
