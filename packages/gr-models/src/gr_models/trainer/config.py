"""The training run configuration: nested dataclasses read from YAML, with `key.sub=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gr_models.trainer.config_checks import ConfigError, check_config

_log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which dataset, how users become samples, and how samples are batched.

    `dataset` is "synthetic", "movielens", "kuairand", "parquet" or "orc"; `path` is its file or folder (unused by
    "synthetic"); `options` are dataset-specific keyword arguments (for "synthetic", `SyntheticConfig` fields).
    """

    dataset: str = "synthetic"
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int = 200
    holdout: int = 1
    max_train_candidates: int = 0
    truncate_side: str = "left"
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    prefetch_factor: int = 2


@dataclass
class HSTUSection:
    """Arguments of `get_hstu_config`. `dtype` "auto" means bfloat16 on CUDA and float32 on CPU."""

    hidden_size: int = 64
    kv_channels: int = 32
    num_attention_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.1
    dtype: str = "auto"
    kernel_backend: str = "auto"
    is_causal: bool = True
    max_attn_len: int = 0
    scaling_seqlen: int | None = None
    alpha: float | None = None
    uvqk_init_std: float | None = None
    layer_norm_affine: bool = True
    uvqk_bias: bool = True
    position_encoding: dict[str, Any] | None = field(default_factory=dict)
    relative_bias: dict[str, Any] | None = None
    recompute_cheap_activations: bool = False
    fused_norm_gate: bool | None = None
    output_bias_init: str = "zeros"
    compile_layers: bool = False


@dataclass
class EmbeddingSection:
    """Embedding tables: one per id feature of the dataset, width = hidden size.

    `default` sets every table's `type` ("static" or "dynamic"), `sharding_type`, `optimizer`, `learning_rate`,
    `weight_decay`, `initializer` ("uniform" / "normal" / "truncated_normal", with optional `init_std`;
    "constant" with `init_value`) and Adam
    `betas` ([beta1, beta2], default [0.9, 0.999]);
    `tables` overrides any of them per feature name. A dynamic table's capacity is `capacity` (default: the
    feature's vocabulary size); an unbounded (hashed) feature needs a dynamic table.
    """

    default: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RankingSection:
    """Prediction head of the ranking GR: hidden widths; the output width (one per task) is appended."""

    prediction_head_hidden: list[int] = field(default_factory=lambda: [128])
    activation: str = "relu"


@dataclass
class RetrievalSection:
    """Loss and evaluation of the retrieval GR (see `RetrievalConfig`); `loss` is "sampled_softmax" or
    "full_softmax" (cross-entropy over every item id)."""

    temperature: float = 0.05
    num_negatives: int = 128
    negative_sampling: str = "uniform"
    negatives_per_query: bool = True
    eval_top_k: list[int] = field(default_factory=lambda: [10, 50])
    eval_exclude_history: bool = False
    loss: str = "sampled_softmax"


@dataclass
class OptimSection:
    """Dense optimizer and schedule. `schedule` is "constant", "linear" or "cosine" (after `warmup_steps`)."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class TrainSection:
    """Loop control. `max_steps` counts optimizer steps, each over `grad_accumulation` micro-batches of
    `data.batch_size` users (the loss is the mean of their mean losses); `eval_batches` None evaluates the whole
    evaluation split; `checkpoint_every` 0 never checkpoints; `keep_last` checkpoints are kept, older ones deleted
    (None keeps every one); `resume` continues from the newest checkpoint of `output_dir` when there is one."""

    max_steps: int = 1000
    grad_accumulation: int = 1
    eval_every: int = 200
    eval_batches: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    keep_last: int | None = 3
    resume: bool = True
    progress_bar: bool = True


@dataclass
class ParallelSection:
    """How the run spreads over the processes `torchrun` starts (one process: nothing to set).

    The world of N processes is split into tensor-parallel groups of `tensor_model_parallel_size` ranks (the HSTU
    layers' heads split across them) and N / that size data-parallel ranks; every data-parallel rank reads its own
    users (`data.batch_size` and `data.eval_batch_size` are per data-parallel rank), the ranks of one
    tensor-parallel group read the same ones. `pipeline` "overlap" prefetches the next batch while the current one
    trains; `balance_sequences` re-partitions each global batch across data-parallel ranks so attention cost is
    even.
    """

    tensor_model_parallel_size: int = 1
    pipeline: str = "none"
    balance_sequences: bool = False

    def __post_init__(self) -> None:
        if self.tensor_model_parallel_size < 1:
            raise ValueError(f"parallel.tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        if self.pipeline not in ("none", "overlap"):
            raise ValueError(f"parallel.pipeline must be 'none' or 'overlap', got {self.pipeline!r}")


@dataclass
class RunConfig:
    """A whole `gr-train` run. `output_dir` defaults to `runs/<name>`; `device` is "auto", "cpu" or "cuda"
    ("auto": the GPU `gr_parallel` assigned to this rank when CUDA is available, else the CPU)."""

    name: str = "run"
    task: str = "ranking"
    model: str = "hstu"
    output_dir: str | None = None
    device: str = "auto"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    hstu: HSTUSection = field(default_factory=HSTUSection)
    embeddings: EmbeddingSection = field(default_factory=EmbeddingSection)
    ranking: RankingSection = field(default_factory=RankingSection)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self) -> None:
        if self.task not in ("ranking", "retrieval"):
            raise ValueError(f"task must be 'ranking' or 'retrieval', got {self.task!r}")
        if self.model not in ("hstu", "sasrec"):
            raise ValueError(f"model must be 'hstu' or 'sasrec', got {self.model!r}")
        if self.model == "sasrec" and self.task != "retrieval":
            raise ValueError("the SASRec baseline is a retrieval model: set task: retrieval")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(path: str, value: Any, tp: Any) -> Any:
    """Validate (and lightly coerce) `value` against the annotation `tp`; errors name the key."""
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"config key {path!r}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {k: _check_value(f"{path}.{k}", v, item) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"config key {path!r} must be {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"config key {path!r}: unsupported annotation {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config key(s) {unknown}{where}; known: {sorted(names)}")
    kwargs = {k: _check_value(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a section's own cross-key check (RunConfig, ParallelSection)
        raise ConfigError(str(error)) from error


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override to a nested dict (the value is parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults), apply overrides, validate every key.

    Types come from the dataclass annotations, ranges and choices from `config_checks.RULES`; `data.options` must
    be options of the dataset. An override that changes `data.dataset` drops the file's `data.options` and
    `data.path` (they belong to the old dataset) unless the overrides set them too. Errors are `ConfigError`s
    naming the key, the value and what is allowed.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    file_data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    file_dataset = file_data.get("dataset", DataConfig.dataset)
    overridden = set()
    for override in overrides or []:
        apply_override(tree, override)
        overridden.add(override.split("=", 1)[0].strip())
    data = tree.get("data")
    if isinstance(data, dict) and "data.dataset" in overridden and data.get("dataset") != file_dataset:
        dropped = [k for k in ("options", "path") if k in data and f"data.{k}" not in overridden]
        for key in dropped:
            del data[key]
        if dropped:
            _log.warning(
                "data.dataset=%s replaces %r: dropped the file's %s", data["dataset"], file_dataset,
                " and ".join(f"data.{k}" for k in dropped),
            )  # fmt: skip
    config = _build(RunConfig, tree)
    check_config(config)
    return config


def config_from_tree(tree: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A checked `RunConfig` from a nested dict (such as `RunConfig.to_dict()` stored in a checkpoint), with
    `overrides` applied first."""
    tree = copy.deepcopy(tree)
    for override in overrides or []:
        apply_override(tree, override)
    config = _build(RunConfig, tree)
    check_config(config)
    return config


def config_to_yaml(config: RunConfig) -> str:
    """The whole config (every key, defaults included) as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
