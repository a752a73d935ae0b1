"""Hybrid sparse/dense parallelism for generative recommenders."""

__version__ = "0.1.0"

__all__ = ["__version__"]
