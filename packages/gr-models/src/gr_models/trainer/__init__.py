"""Training of GR models: run configuration, builders, optimizers, the loop and its records."""

from gr_models.trainer.builders import build_model, build_train_dataset
from gr_models.trainer.config import RunConfig, load_config
from gr_models.trainer.optim import OptimizerBundle, lr_multiplier
from gr_models.trainer.trainer import StepStats, Trainer, TrainResult, sequence_tokens
from gr_models.trainer.world import RunWorld, initialize_run_world

__all__ = [
    "OptimizerBundle",
    "RunConfig",
    "RunWorld",
    "StepStats",
    "TrainResult",
    "Trainer",
    "build_model",
    "build_train_dataset",
    "initialize_run_world",
    "load_config",
    "lr_multiplier",
    "sequence_tokens",
]
