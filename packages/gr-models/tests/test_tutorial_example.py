"""The seed-000 tutorial: the example script runs unchanged, and its API flow works at small sizes.

`examples/tutorial.py` is the tutorial with only its imports mapped to this project's packages and the `device`
it uses defined. It asks for `KernelBackend.CUTLASS`, which needs hstu-attn's compiled library, so the script
runs as a copy whose one backend argument names TRITON (on a GPU) or PYTORCH (on the CPU). On the CPU the
script takes minutes (its batch of 128 users x up to 400 tokens runs in bfloat16, which this CPU has no fast
matmul for), so that run is marked slow; the fast test below walks the same API calls at small sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gr_checkpoint
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

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"


def _run_script(tmp_path: Path, backend: str) -> subprocess.CompletedProcess[str]:
    """Run a copy of the tutorial whose `kernel_backend` argument names `backend` instead of CUTLASS."""
    source = SCRIPT.read_text()
    requested = "kernel_backend=KernelBackend.CUTLASS,"
    assert source.count(requested) == 1, "the tutorial no longer passes CUTLASS in one place"
    script = tmp_path / "tutorial.py"
    script.write_text(source.replace(requested, f"kernel_backend=KernelBackend.{backend},"))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=1200
    )


def _check_run(result: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / "manifest.json").is_file()
    assert (checkpoint / "dynamicemb_module").is_dir() and (checkpoint / "torch_module").is_dir()


@pytest.mark.gpu
def test_tutorial_script_runs_unchanged_on_gpu(tmp_path: Path) -> None:
    _check_run(_run_script(tmp_path, "TRITON"), tmp_path)


@pytest.mark.slow
def test_tutorial_script_runs_unchanged_on_cpu(tmp_path: Path) -> None:
    _check_run(_run_script(tmp_path, "PYTORCH"), tmp_path)


def test_tutorial_cutlass_backend_fails_clearly_without_the_library() -> None:
    config = get_hstu_config(8, 8, 1, 1, kernel_backend=KernelBackend.CUTLASS)
    table = ShardedEmbeddingConfig(["item"], "item", 10, 8)
    model = RankingGR(config, RankingConfig([table], [[4, 1]]), device="cpu")
    batch = RankingBatch.random(2, [FeatureConfig(["item"], [10], 4)], "item", max_num_candidates=1)
    with pytest.raises(NotImplementedError, match="CUTLASS"):
        model(batch)


def test_tutorial_api_flow_at_small_sizes(tmp_path: Path) -> None:
    optimizer = EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=0.0001)
    dim = 16
    emb_configs = [
        ShardedEmbeddingConfig(
            feature_names=["user_feat0"], table_name="user_table0", vocab_size=50, dim=dim,
            sharding_type="model_parallel", initializer=UniformInitializer(), optimizer_param=optimizer,
        ),
        ShardedEmbeddingConfig(
            feature_names=["act_feat"], table_name="act", vocab_size=10, dim=dim,
            sharding_type="data_parallel", initializer=UniformInitializer(), optimizer_param=optimizer,
        ),
        DynamicShardedEmbeddingConfig(
            feature_names=["item_feat"], table_name="item", vocab_size=100, dim=dim,
            initializer=UniformInitializer(), optimizer_param=optimizer,
            global_hbm_for_values=0, evict_strategy=DynamicEmbEvictStrategy.LRU,
        ),
    ]  # fmt: skip
    hstu_config = get_hstu_config(
        hidden_size=dim, kv_channels=8, num_attention_heads=2, num_layers=2, init_method=UniformInitializer(),
        dtype=torch.bfloat16, is_causal=True, kernel_backend=KernelBackend.PYTORCH,
    )  # fmt: skip
    task_config = RankingConfig(embedding_configs=emb_configs, prediction_head_arch=[[16, 4, 1] for _ in range(1)])
    model = RankingGR(hstu_config=hstu_config, task_config=task_config)
    batch = RankingBatch.random(
        batch_size=8,
        feature_configs=[
            FeatureConfig(feature_names=["user_feat0"], max_item_ids=[50], max_sequence_length=3, is_jagged=True),
            FeatureConfig(["item_feat", "act_feat"], max_item_ids=[100, 10], max_sequence_length=12, is_jagged=True),
        ],
        item_feature_name="item_feat",
        contextual_feature_names=["user_feat0"],
        action_feature_name="act_feat",
        max_num_candidates=3,
        device=torch.device("cpu"),
        num_tasks=1,
    )
    loss, (logits, labels) = model(batch)
    assert loss.shape == logits.shape == labels.shape == (int(batch.num_candidates.sum()), 1)
    loss.sum().backward()
    assert all(p.grad is not None for p in model.dense_parameters())

    model.eval()
    before, _ = model(batch)
    gr_checkpoint.save(tmp_path / "checkpoint", model)
    restored = RankingGR(hstu_config=hstu_config, task_config=task_config).eval()
    gr_checkpoint.load(tmp_path / "checkpoint", restored)
    after, _ = restored(batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
