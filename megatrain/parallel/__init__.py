"""Distributed pieces of megatrain: rank discovery (env), DP x SP groups (groups), sequence parallelism (sequence),
activation checkpointing + offload applied to the model (checkpointing).

    from megatrain.parallel import make_ema_boundary, validate_sp, reduce_sp_loss
    from megatrain.parallel import discover, ParallelGroups        # from env.py / groups.py

env/groups names are resolved lazily so that importing one submodule never requires the others.
"""
from megatrain.parallel.sequence import (  # noqa: F401
    COMM_STATS,
    BoundaryHandle,
    EMABoundary,
    make_ema_boundary,
    reduce_sp_loss,
    reset_comm_stats,
    sum_grads_over,
    validate_sp,
)

_LAZY = {
    "discover": "megatrain.parallel.env",
    "DistEnv": "megatrain.parallel.env",
    "ParallelGroups": "megatrain.parallel.groups",
    "sp_slice": "megatrain.data",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
