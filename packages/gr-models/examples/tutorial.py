"""The HSTU ranking tutorial (reference document 000) on this project's packages.

The code below is the tutorial's, block by block, with two kinds of change only:

* imports: `distributed_recommender.<x>` -> `gr_models.<x>`, `distributed_recommender.utils.initialize` ->
  `gr_parallel.initialize`, `distributed_recommender.checkpoint` -> `gr_checkpoint`;
* `device`: the tutorial passes `device=device` to `RankingBatch.random` without defining it; it is defined
  here as the device `gr_parallel.initialize.initialize_distributed()` selected (the current CUDA device, or
  the CPU when there is none).

The tutorial asks for `KernelBackend.CUTLASS`, as the seed does; where hstu-attn's CUTLASS library is not built
(always on a CPU) selecting it raises NotImplementedError. To run the script there, pass another backend in its
`get_hstu_config` call: `KernelBackend.AUTO` falls back to Triton on a GPU and to the PyTorch reference on a
CPU; `tests/test_tutorial_example.py` runs a copy with PYTORCH or TRITON in that place.
"""

import os

import torch

import gr_checkpoint
import gr_models
import gr_parallel.initialize as init
from gr_models.configs import (
    DynamicShardedEmbeddingConfig,
    KernelBackend,
    RankingConfig,
    ShardedEmbeddingConfig,
    get_hstu_config,
)
from gr_models.data.utils import RankingBatch
from gr_models.model.ranking_gr import RankingGR
from gr_models.modules.embedding import EmbeddingOptimizerParam
from gr_models.utils.tensor_initializer import UniformInitializer

init.initialize_distributed()
init.initialize_model_parallel()
init.set_random_seed(1234)
device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

from dynamicemb import DynamicEmbEvictStrategy  # noqa: E402

user_vocab_size = 1000
item_vocab_size = 1000
action_vocab_size = 10
dim_size = 128

embedding_optimizer_param = EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=0.0001)
emb_configs = [
    ShardedEmbeddingConfig(
        feature_names=["user_feat0"],
        table_name="user_table0",
        vocab_size=user_vocab_size,
        dim=dim_size,
        sharding_type="model_parallel",
        initializer=UniformInitializer(),
        optimizer_param=embedding_optimizer_param,
    ),
    ShardedEmbeddingConfig(
        feature_names=["user_feat1"],
        table_name="user_table1",
        vocab_size=user_vocab_size,
        dim=dim_size,
        sharding_type="model_parallel",
        initializer=UniformInitializer(),
        optimizer_param=embedding_optimizer_param,
    ),
    ShardedEmbeddingConfig(
        feature_names=["act_feat"],
        table_name="act",
        vocab_size=action_vocab_size,
        dim=dim_size,
        sharding_type="data_parallel",
        initializer=UniformInitializer(),
        optimizer_param=embedding_optimizer_param,
    ),
    DynamicShardedEmbeddingConfig(
        feature_names=["item_feat"],
        table_name="item",
        vocab_size=item_vocab_size,
        dim=dim_size,
        initializer=UniformInitializer(),
        optimizer_param=embedding_optimizer_param,
        global_hbm_for_values=0,
        evict_strategy=DynamicEmbEvictStrategy.LRU,
    ),
]

hstu_config = get_hstu_config(
    hidden_size=dim_size,
    kv_channels=128,
    num_attention_heads=4,
    num_layers=3,
    init_method=UniformInitializer(),
    dtype=torch.bfloat16,
    is_causal=True,
    kernel_backend=KernelBackend.CUTLASS,
)

task_config = RankingConfig(
    embedding_configs=emb_configs,
    prediction_head_arch=[[128, 10, 1] for _ in range(1)],
)
ranking_model_train = RankingGR(hstu_config=hstu_config, task_config=task_config)

batch = RankingBatch.random(
    batch_size=128,
    feature_configs=[
        gr_models.data.utils.FeatureConfig(
            feature_names=["user_feat0"],
            max_item_ids=[user_vocab_size],
            max_sequence_length=10,
            is_jagged=True,
        ),
        gr_models.data.utils.FeatureConfig(
            feature_names=["user_feat1"],
            max_item_ids=[user_vocab_size],
            max_sequence_length=10,
            is_jagged=True,
        ),
        gr_models.data.utils.FeatureConfig(
            feature_names=["item_feat", "act_feat"],
            max_item_ids=[item_vocab_size, action_vocab_size],
            max_sequence_length=180,
            is_jagged=True,
        ),
    ],
    item_feature_name="item_feat",
    contextual_feature_names=["user_feat0", "user_feat1"],
    action_feature_name="act_feat",
    max_num_candidates=20,
    device=device,
    num_tasks=1,
)
loss, _ = ranking_model_train(batch)
loss.sum().backward()

init.destroy_global_state()

save_path = "./checkpoint"
os.makedirs(save_path, exist_ok=True)
gr_checkpoint.save(save_path, ranking_model_train)
gr_checkpoint.load(save_path, ranking_model_train)
