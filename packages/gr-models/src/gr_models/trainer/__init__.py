"""Training of GR models: run configuration, builders, optimizers, the loop and its records."""

from gr_models.trainer.builders import build_model, build_train_dataset, resolve_device
from gr_models.trainer.config import RunConfig, load_config
from gr_models.trainer.optim import OptimizerBundle, lr_multiplier
from gr_models.trainer.trainer import Trainer, TrainResult, sequence_tokens

__all__ = [
    "OptimizerBundle",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "build_train_dataset",
    "load_config",
    "lr_multiplier",
    "resolve_device",
    "sequence_tokens",
]
