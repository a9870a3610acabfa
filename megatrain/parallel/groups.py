"""Data-parallel x sequence-parallel process groups, exposed as DeepSpeed's model-parallel unit (mpu).

Usage (after torch.distributed is initialised, on every rank, in the same order)::

    groups = ParallelGroups(dp_size=2, sp_size=2)
    groups.sp_rank, groups.dp_rank, groups.sp_group
    deepspeed.initialize(..., mpu=groups)

Layout: ranks of one SP group are consecutive (``rank = dp_rank * sp_size + sp_rank``), so an SP group stays on
one node whenever sp_size divides the GPUs per node. DeepSpeed reads from this object:
  * ``get_data_parallel_*``: our DP size — its batch-size arithmetic and gradient-averaging divisor;
  * ``get_sequence_data_parallel_group``: all DP x SP ranks — gradient all-reduce and ZeRO sharding;
  * ``get_sequence_parallel_world_size``: it divides the all-reduced sum by (DP x SP) / SP = DP.
So the gradients are *summed* over the SP ranks of a window and *averaged* over DP replicas; the trainer's
per-rank loss (local token-loss sum / the window's total label tokens) makes that sum exactly the SP=1 gradient.
There is no tensor parallelism: the model-parallel group of a rank is the rank alone.
"""
from __future__ import annotations

import torch.distributed as dist


def layout(rank: int, dp_size: int, sp_size: int) -> tuple:
    """(dp_rank, sp_rank) of a global rank."""
    if dp_size < 1 or sp_size < 1:
        raise ValueError(f"dp_size={dp_size} and sp_size={sp_size} must be >= 1")
    if not 0 <= rank < dp_size * sp_size:
        raise ValueError(f"rank {rank} is outside dp_size*sp_size={dp_size * sp_size}")
    return rank // sp_size, rank % sp_size


class ParallelGroups:
    def __init__(self, dp_size: int, sp_size: int):
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups needs torch.distributed to be initialised first")
        world = dist.get_world_size()
        if dp_size * sp_size != world:
            raise ValueError(f"dp_size={dp_size} x sp_size={sp_size} != world size {world}")
        self.dp_size, self.sp_size, self.rank = dp_size, sp_size, dist.get_rank()
        self.dp_rank, self.sp_rank = layout(self.rank, dp_size, sp_size)
        # new_group is collective: every rank creates every group, in the same order.
        for d in range(dp_size):
            ranks = list(range(d * sp_size, (d + 1) * sp_size))
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self.sp_group, self.sp_ranks = g, ranks
        for s in range(sp_size):
            ranks = list(range(s, world, sp_size))
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self.dp_group, self.dp_ranks = g, ranks
        for r in range(world):
            g = dist.new_group([r])
            if r == self.rank:
                self.mp_group = g
        self.world_group = dist.new_group(list(range(world)))

    def __repr__(self) -> str:
        return (f"ParallelGroups(rank={self.rank}, dp={self.dp_rank}/{self.dp_size}, "
                f"sp={self.sp_rank}/{self.sp_size})")

    def zero3_partition(self, model, ds_config: dict) -> None:
        """Partition a built model's parameters for ZeRO-3 over DP x SP (no-op below stage 3).

        Left alone, DeepSpeed's ZeRO-3 partitions parameters over the mpu's ``get_data_parallel_group()`` (the DP
        group) but reduces gradients over DP x SP: the shards then disagree between SP ranks. Converting here,
        over the same group as the gradients, keeps both on the same ranks (the engine then sees parameters that
        are already partitioned and leaves them). Done after construction rather than under ``zero.Init`` so model
        code may initialise its parameters freely in ``__init__``."""
        if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
            return
        import deepspeed
        deepspeed.zero.Init(module=model, data_parallel_group=self.world_group, config_dict_or_path=ds_config,
                            mpu=self)

    # ---- DeepSpeed mpu interface ----
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_world_size(self): return self.dp_size
    def get_data_parallel_group(self): return self.dp_group
    def get_data_parallel_group_ranks(self): return self.dp_ranks

    def get_sequence_parallel_rank(self): return self.sp_rank
    def get_sequence_parallel_world_size(self): return self.sp_size
    def get_sequence_parallel_group(self): return self.sp_group

    def get_sequence_data_parallel_rank(self): return self.rank
    def get_sequence_data_parallel_world_size(self): return self.dp_size * self.sp_size
    def get_sequence_data_parallel_group(self): return self.world_group

    def get_model_parallel_rank(self): return 0
    def get_model_parallel_world_size(self): return 1
    def get_model_parallel_group(self): return self.mp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
