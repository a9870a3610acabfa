"""Pretrain MEGA: the job's entry point (a thin wrapper over megatrain.train.trainer.main).

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/X.yaml [dotted.key=value ...]
    torchrun --nproc_per_node N launch/pretrain.py --config ...
    mpiexec -n N python launch/pretrain.py --config ...
    srun python launch/pretrain.py --config ...          (see launch/slurm/pretrain.sbatch)
    python launch/pretrain.py --config ...               (one process; CPU with gloo when there is no GPU)
"""
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.host_alloc import configure_host_allocator, preload_fast_malloc  # noqa: E402

preload_fast_malloc()       # tcmalloc where the system has it: megatrain/host_alloc.py (a re-exec, so first)
configure_host_allocator()  # before torch is imported: PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation
from megatrain.parallel.env import exit_process  # noqa: E402
from megatrain.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())  # not sys.exit: see exit_process (gloo threads can abort interpreter finalization)
