"""Range and choice rules of every `RunConfig` key, checked when a config loads, and the `gr-train --help` listing.

Types are checked by `gr_models.trainer.config` from the dataclass annotations; this module adds what a type
cannot say (`train.max_steps >= 0`, `optim.schedule` one of three names, ...). Every scalar or list key of the
config has a rule here (a test keeps it so); a key whose value may be anything its type allows says so with
`Rule()`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from gr_models.configs.hstu_config import OUTPUT_BIAS_INITS

__all__ = ["RULES", "ConfigError", "Rule", "check_config", "check_dataset_options", "check_key", "describe_config"]


class ConfigError(ValueError):
    """A config key with a value that is not allowed; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What a key's value may be, beyond its type.

    Attributes:
        low, high: inclusive bounds (None: unbounded); `low_open` / `high_open` make them exclusive.
        choices: the allowed values.
        each: apply the bounds to every element of a list value.
        length: the exact number of elements of a list value.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    each: bool = False
    length: int | None = None

    def allowed(self) -> str:
        """What the rule allows, in words ("" when anything of the key's type is allowed)."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            parts.append(f"in {left}{self.low:g}, {self.high:g}{right}")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        elif self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = " ".join(parts)
        if self.each:
            text = f"values {text}" if text else ""
        if self.length is not None:
            text = f"{self.length} {text or 'values'}"
        return text

    def admits(self, value: Any) -> bool:
        if value is None:
            return True  # None is allowed exactly where the annotation is Optional (checked with the type)
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                return False
            return all(self._admits_one(v) for v in value) if self.each else True
        return self._admits_one(value)

    def _admits_one(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


_POSITIVE = Rule(low=0, low_open=True)
_AT_LEAST_0 = Rule(low=0)
_AT_LEAST_1 = Rule(low=1)
_ANY = Rule()

RULES: dict[str, Rule] = {
    "name": _ANY,
    "task": Rule(choices=("ranking", "retrieval")),
    "model": Rule(choices=("hstu", "sasrec")),
    "output_dir": _ANY,
    "device": _ANY,  # auto, cpu, cuda or cuda:N: checked by RunConfig
    "seed": _AT_LEAST_0,
    "data.dataset": Rule(choices=("synthetic", "movielens", "kuairand", "parquet", "orc")),
    "data.path": _ANY,
    "data.options": _ANY,  # checked against the dataset's parameters by `check_dataset_options`
    "data.max_sequence_length": _AT_LEAST_1,
    "data.holdout": _AT_LEAST_1,
    "data.max_train_candidates": _AT_LEAST_0,
    "data.truncate_side": Rule(choices=("left", "right")),
    "data.batch_size": _AT_LEAST_1,
    "data.eval_batch_size": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0,
    "data.prefetch_factor": _AT_LEAST_1,
    "hstu.hidden_size": _AT_LEAST_1,
    "hstu.kv_channels": _AT_LEAST_1,
    "hstu.num_attention_heads": _AT_LEAST_1,
    "hstu.num_layers": _AT_LEAST_1,
    "hstu.dropout": Rule(low=0, high=1, high_open=True),
    "hstu.dtype": Rule(choices=("auto", "float32", "bfloat16", "float16")),
    "hstu.kernel_backend": Rule(choices=("auto", "pytorch", "triton", "cutlass")),
    "hstu.is_causal": _ANY,
    "hstu.max_attn_len": _AT_LEAST_0,
    "hstu.scaling_seqlen": _AT_LEAST_1,
    "hstu.alpha": _POSITIVE,
    "hstu.uvqk_init_std": _POSITIVE,
    "hstu.layer_norm_affine": _ANY,
    "hstu.uvqk_bias": _ANY,
    "hstu.position_encoding": _ANY,  # PositionEncodingConfig's fields, checked when the model is built
    "hstu.relative_bias": _ANY,  # RelativeBiasConfig's fields, checked when the model is built
    "hstu.recompute_cheap_activations": _ANY,
    "hstu.fused_norm_gate": _ANY,  # True, False or null (auto: fused on CUDA); the type is checked
    "hstu.output_bias_init": Rule(choices=OUTPUT_BIAS_INITS),
    "hstu.compile_layers": _ANY,  # a bool (the type is checked)
    "embeddings.default": _ANY,  # table options, checked against the dataset's features when the model is built
    "embeddings.tables": _ANY,
    "ranking.prediction_head_hidden": Rule(low=1, each=True),
    "ranking.activation": Rule(choices=("relu", "gelu", "silu")),
    "retrieval.temperature": _POSITIVE,
    "retrieval.num_negatives": _AT_LEAST_0,
    "retrieval.negative_sampling": Rule(choices=("uniform", "in_batch", "mixed")),
    "retrieval.negatives_per_query": _ANY,
    "retrieval.eval_top_k": Rule(low=1, each=True),
    "retrieval.eval_exclude_history": _ANY,
    "retrieval.loss": Rule(choices=("sampled_softmax", "full_softmax")),
    "optim.optimizer": Rule(choices=("adam", "adamw")),
    "optim.learning_rate": _POSITIVE,
    "optim.betas": Rule(low=0, high=1, high_open=True, each=True, length=2),
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.schedule": Rule(choices=("constant", "linear", "cosine")),
    "optim.warmup_steps": _AT_LEAST_0,
    "optim.min_lr_ratio": Rule(low=0, high=1),
    "optim.grad_clip": _AT_LEAST_0,
    "train.max_steps": _AT_LEAST_0,
    "train.grad_accumulation": _AT_LEAST_1,
    "train.eval_every": _AT_LEAST_0,
    "train.eval_batches": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.checkpoint_every": _AT_LEAST_0,
    "train.keep_last": _AT_LEAST_1,
    "train.resume": _ANY,
    "train.progress_bar": _ANY,
    "parallel.tensor_model_parallel_size": _AT_LEAST_1,
    "parallel.pipeline": Rule(choices=("none", "overlap")),
    "parallel.balance_sequences": _ANY,
}


def check_key(path: str, value: Any) -> None:
    """Raise `ConfigError` when `value` breaks the rule of key `path` (dotted); keys without a rule pass."""
    rule = RULES.get(path)
    if rule is not None and not rule.admits(value):
        raise ConfigError(f"config key {path!r} = {value!r} is not allowed: must be {rule.allowed()}")


# window settings the trainer passes to every dataset from `data.*`; they are not `data.options`
_WINDOW_KEYS = frozenset({"kind", "split", "max_sequence_length", "holdout", "max_train_candidates", "truncate_side"})


def _dataset_parameters(dataset: str) -> set[str] | None:
    """Names `data.options` may use for `dataset` (None when unknown)."""
    if dataset == "synthetic":
        from gr_models.data.synthetic import SyntheticConfig

        return {f.name for f in dataclasses.fields(SyntheticConfig)}
    if dataset == "movielens":
        from gr_models.data.movielens import MovieLensDataset as cls
    elif dataset == "kuairand":
        from gr_models.data.kuairand import KuaiRandDataset as cls  # type: ignore[assignment]
    elif dataset in ("parquet", "orc"):
        from gr_models.data.table import SequenceTableDataset as cls  # type: ignore[assignment]
    else:
        return None
    names = set(inspect.signature(cls.__init__).parameters) - {"self"} - _WINDOW_KEYS
    if dataset == "kuairand":
        names.add("log_paths")
    else:
        names -= {"root", "paths"}  # given as data.path
    if dataset in ("parquet", "orc"):
        names.discard("file_format")  # follows data.dataset
    return names


def check_dataset_options(dataset: str, options: dict[str, Any]) -> None:
    """Raise `ConfigError` naming the first key of `data.options` that `dataset` does not take."""
    known = _dataset_parameters(dataset)
    if known is None:
        return
    for key in options:
        if key not in known:
            raise ConfigError(
                f"config key 'data.options.{key}' is not an option of dataset {dataset!r}; "
                f"its options: {', '.join(sorted(known))}"
            )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is not None and type(None) in typing.get_args(tp):
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return " | ".join(_type_name(t) for t in inner) + " | null"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe_config(cls: type, prefix: str = "") -> list[str]:
    """One line per key of the config dataclass `cls`: `key = default  (type; allowed)`, sections as headers."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    scalars, sections = [], []
    for f in dataclasses.fields(cls):
        (sections if dataclasses.is_dataclass(hints[f.name]) else scalars).append(f)
    defaults = cls()
    for f in scalars:
        path = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        rule = RULES.get(path, _ANY)
        allowed = rule.allowed()
        shown = "null" if value is None else repr(value)
        lines.append(f"  {path} = {shown}  ({_type_name(hints[f.name])}{'; ' + allowed if allowed else ''})")
    for f in sections:
        doc = inspect.getdoc(hints[f.name]) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        lines.append(f"{f.name}: {summary}")
        lines.extend(describe_config(hints[f.name], f"{prefix}{f.name}."))
    return lines


def check_config(config: Any, prefix: str = "") -> None:
    """Check every key of a config dataclass instance against `RULES` (sections recursively) and the dataset's
    options; raise `ConfigError` at the first key that breaks its rule."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{prefix}{f.name}.")
        else:
            check_key(f"{prefix}{f.name}", value)
    if prefix == "" and hasattr(config, "data"):
        check_dataset_options(config.data.dataset, config.data.options)
