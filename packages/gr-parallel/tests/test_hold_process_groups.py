"""destroy_global_state() defers the teardown while a model registered with hold_process_groups_for is alive."""

from __future__ import annotations

import gc

import torch.distributed as dist

import gr_parallel


class _Model:
    pass


def test_teardown_waits_for_registered_models() -> None:
    gr_parallel.initialize_distributed(backend="gloo")
    gr_parallel.initialize_model_parallel(1)
    model = _Model()
    gr_parallel.hold_process_groups_for(model)
    gr_parallel.destroy_global_state()
    assert dist.is_initialized() and gr_parallel.model_parallel_is_initialized()
    dist.barrier()  # the groups still work, e.g. for a collective checkpoint of the model

    del model
    gc.collect()
    gr_parallel.destroy_global_state()
    assert not dist.is_initialized() and not gr_parallel.model_parallel_is_initialized()
