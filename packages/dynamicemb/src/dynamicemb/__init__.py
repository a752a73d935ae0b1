"""GPU hash-table embeddings that drop into TorchRec models."""

__version__ = "0.1.0"

__all__ = ["__version__"]
