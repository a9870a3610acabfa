"""Distributed pieces of megatrain: rank discovery (env), DP x SP groups (groups), sequence parallelism (sequence),
the one forward over a window (protocol), activation checkpointing + offload applied to the model (checkpointing).

    from megatrain.parallel import make_ema_boundary, validate_sp, reduce_sp_loss, forward_window, sp_slice
    from megatrain.parallel import discover, ParallelGroups        # from env.py / groups.py

Every name is resolved lazily, so that importing one submodule never loads the others: the exported remote code
imports checkpointing.py alone, and nothing distributed may come with it (tests/hf/test_remote_code.py).
"""
_LAZY = {
    **{name: "megatrain.parallel.sequence" for name in (
        "COMM_STATS", "BoundaryHandle", "EMABoundary", "make_ema_boundary", "reduce_sp_loss", "reset_comm_stats",
        "sum_grads_over", "validate_sp")},
    "discover": "megatrain.parallel.env",
    "DistEnv": "megatrain.parallel.env",
    "ParallelGroups": "megatrain.parallel.groups",
    **{name: "megatrain.parallel.protocol" for name in (
        "forward_window", "sp_forward", "sp_forward_backward", "sp_slice")},
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
