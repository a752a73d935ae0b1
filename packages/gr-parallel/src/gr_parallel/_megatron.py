"""Megatron-core modules, imported without its warnings that TransformerEngine/Apex are absent.

Without them megatron-core falls back to its own PyTorch implementations, which is what this
package uses; the warnings would only add noise to every process of a run.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

__all__ = ["ModelParallelConfig", "parallel_state", "tensor_parallel"]
