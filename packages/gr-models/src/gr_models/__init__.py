"""HSTU ranking and retrieval generative recommenders."""

__version__ = "0.1.0"

__all__ = ["__version__"]
