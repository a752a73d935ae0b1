"""Small helpers shared by gr-models: tensor initializers."""

from gr_models.utils.tensor_initializer import (
    ConstantInitializer,
    Initializer,
    NormalInitializer,
    TruncatedNormalInitializer,
    UniformInitializer,
    XavierUniformInitializer,
)

__all__ = [
    "ConstantInitializer",
    "Initializer",
    "NormalInitializer",
    "TruncatedNormalInitializer",
    "UniformInitializer",
    "XavierUniformInitializer",
]
