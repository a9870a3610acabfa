"""ZeRO through DeepSpeed: the DeepSpeed JSON generated from our run config, and the engine policy that goes with it.

    from megatrain.parallel.zero import deepspeed_config, clip_in_optimizer
    ds = deepspeed_config(cfg, world_size=2)    # the one DeepSpeed JSON of a run (cfg.deepspeed merged on top)
    guard = clip_in_optimizer(cfg)              # True: our optimizer clips/skips; DeepSpeed's clipping is off
"""
from __future__ import annotations

import copy


def clip_in_optimizer(cfg) -> bool:
    """Plain fp32 DeepSpeed (no ZeRO, no bf16 wrapper) steps our optimizer directly: it clips and guards."""
    return cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON for this run. The optimizer and LR schedule are ours (passed to deepspeed.initialize),
    so only batch, precision, clipping and ZeRO live here; ``cfg.deepspeed`` is merged on top. Reads the train,
    parallel, data.micro_batch_size and deepspeed parts of the whole Config."""
    dp_size = world_size // cfg.parallel.sequence_parallel_size
    t = cfg.train
    ds = {
        # DeepSpeed's "data parallel" world is our DP size (the mpu says so); SP ranks share one batch.
        "train_batch_size": cfg.data.micro_batch_size * t.grad_accum_steps * dp_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        # fp32 without ZeRO: our GuardedAdamW clips (it needs the pre-clip norm to report and to skip NaN steps)
        "gradient_clipping": 0.0 if clip_in_optimizer(cfg) else t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.zero_stage == 3 and cfg.parallel.sequence_parallel_size > 1:
        # ZeRO-3's reduce-scatter path averages over all DP x SP ranks and ignores the SP size (its contiguous
        # all-reduce path divides by DP like stages 0-2): keep it on the path that matches (tests/parallel).
        ds["zero_optimization"]["reduce_scatter"] = False
    return _merge(ds, cfg.deepspeed)
