"""The example run configs in packages/gr-models/configs/ parse, validate and build runnable trainers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gr_models.model import RankingGR, RetrievalGR, SASRec
from gr_models.modules.dynamic_embedding import build_dynamic_collection  # noqa: F401  (dynamicemb importable)
from gr_models.trainer import Trainer, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ML1M = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "ml-1m"  # ../shared beside the repository
ML1M_RATINGS = ML1M / "partial" / "ratings_users0001-2999.dat.gz"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem
    assert config.run_dir == Path("runs") / path.stem


def test_ml1m_configs_follow_the_anchor_setup() -> None:
    hstu = load_config(CONFIGS / "ml1m_retrieval_hstu.yaml")
    large = load_config(CONFIGS / "ml1m_retrieval_hstu_large.yaml")
    sasrec = load_config(CONFIGS / "ml1m_retrieval_sasrec.yaml")
    for config in (hstu, large, sasrec):
        assert config.data.max_sequence_length == 200 and config.data.batch_size == 128
        assert config.hstu.hidden_size == 50 and config.hstu.dropout == 0.2
        assert config.optim.learning_rate == 1e-3 and config.optim.betas == [0.9, 0.98]
        assert config.retrieval.num_negatives == 128 and config.retrieval.temperature == 0.05
    assert (hstu.hstu.num_layers, hstu.hstu.num_attention_heads, hstu.hstu.kv_channels) == (2, 1, 50)
    for config in (hstu, large, sasrec):  # the fixes of issue 26 (README, "ML-1M retrieval: learning speed")
        assert config.hstu.position_encoding["scale_embeddings"] is True
        assert config.embeddings.default["betas"] == [0.9, 0.98]
    for config in (hstu, large):
        assert config.hstu.alpha == 1.0 and config.hstu.relative_bias is not None
        assert config.hstu.uvqk_init_std == 0.02
    assert (large.hstu.num_layers, large.hstu.num_attention_heads, large.hstu.kv_channels) == (8, 2, 25)
    assert (sasrec.model, sasrec.hstu.num_layers, sasrec.hstu.num_attention_heads) == ("sasrec", 2, 1)


def test_synthetic_demo_config_builds_a_ranking_gr(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "synthetic_ranking.yaml", [f"output_dir={tmp_path}", "device=cpu"])
    trainer = Trainer(config)
    assert isinstance(trainer.model, RankingGR) and trainer.model.num_tasks == 2


@pytest.mark.skipif(not ML1M_RATINGS.is_file(), reason="the shared MovieLens-1M ratings are not on this machine")
@pytest.mark.parametrize(
    ("name", "model_class"), [("ml1m_retrieval_hstu", RetrievalGR), ("ml1m_retrieval_sasrec", SASRec)]
)
def test_ml1m_retrieval_configs_train_a_step(tmp_path: Path, name: str, model_class: type) -> None:
    overrides = [f"output_dir={tmp_path}", "device=cpu", "train.max_steps=1", "train.eval_every=0",
                 "train.eval_batches=1", "train.progress_bar=false", "data.batch_size=16",
                 f"data.path={ML1M}"]  # fmt: skip
    trainer = Trainer(load_config(CONFIGS / f"{name}.yaml", overrides))
    assert type(trainer.model) is model_class
    result = trainer.train()
    assert set(result.metrics) == {"hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"}


def test_kuairand_config_trains_with_a_dynamic_item_table_and_relative_bias(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["user_id,video_id,time_ms,is_click,long_view,is_like,is_follow"]
    for user in range(12):
        for event in range(10):
            flags = ",".join(str(int(x)) for x in rng.random(4) < 0.4)
            rows.append(f"{user},{int(rng.integers(0, 10**9))},{1_650_000_000_000 + 60_000 * event},{flags}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    overrides = [
        f"output_dir={tmp_path / 'run'}", "device=cpu", "train.max_steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.progress_bar=false", f"data.options.log_paths=[{log}]",
        "data.options.user_features_path=null", "data.num_workers=0", "data.batch_size=4", "data.holdout=2",
        "data.max_train_candidates=2", "data.max_sequence_length=8", "hstu.hidden_size=16", "hstu.kv_channels=8",
        "hstu.num_layers=1", "ranking.prediction_head_hidden=[8]",
    ]  # fmt: skip
    trainer = Trainer(load_config(CONFIGS / "kuairand_ranking.yaml", overrides))
    assert trainer.model.embedding.dynamic is not None and "item_id_table" in trainer.model.embedding.dynamic
    assert trainer.model.hstu_block.layers[0].relative_bias is not None
    result = trainer.train()
    assert {"auc/is_click", "auc/long_view", "auc/is_like", "auc/is_follow"} <= set(result.metrics)


def test_parquet_table_with_feature_ops_trains_from_a_config(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    lengths = rng.integers(4, 12, size=20)
    table = pa.table(
        {
            "user": [f"u{i}" for i in range(20)],
            "items": [rng.integers(0, 10**12, n).tolist() for n in lengths],
            "clicks": [(rng.random(n) < 0.5).astype(int).tolist() for n in lengths],
            "ts": [sorted(rng.integers(0, 10**6, n).tolist()) for n in lengths],
        }
    )
    pq.write_table(table, tmp_path / "users.parquet")
    config = f"""
name: table
task: ranking
device: cpu
data:
  dataset: parquet
  path: {tmp_path / "users.parquet"}
  options:
    item: {{column: items, name: item_id, ops: [{{op: hash, num_buckets: 0}}]}}
    label_columns: [clicks]
    timestamp_column: ts
    contextual: [{{column: user, name: user_id, ops: [{{op: hash, num_buckets: 64}}]}}]
  max_sequence_length: 10
  holdout: 2
  max_train_candidates: 2
  batch_size: 4
hstu: {{hidden_size: 16, kv_channels: 8, num_layers: 1, position_encoding: {{use_time_encoding: true}}}}
embeddings:
  tables: {{item_id: {{type: dynamic, capacity: 4096}}}}
train: {{max_steps: 2, eval_every: 0, progress_bar: false}}
"""
    path = tmp_path / "table.yaml"
    path.write_text(config)
    trainer = Trainer(load_config(path, [f"output_dir={tmp_path / 'run'}"]))
    assert trainer.train_dataset.schema.vocab_sizes["item_id"] == 0  # hashed into the int64 key space
    result = trainer.train()
    assert set(result.metrics) == {"auc/clicks", "accuracy/clicks", "logloss/clicks"}
