"""Rank discovery from each launcher's environment (fake environments; the real launchers run in tests/train).

Run: PYTHONPATH=. python -m pytest -q tests/parallel/test_env.py
"""
import pytest

from megatrain.parallel.env import DistEnv, discover, expand_slurm_nodelist


def test_torchrun_and_deepspeed_env():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                    "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert env == DistEnv(3, 4, 1, "10.0.0.2", 1234, "torchrun")
    env = discover({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29501"})
    assert env.launcher == "env" and env.world_size == 2


def test_env_wins_over_slurm():
    # torchrun inside an srun allocation: RANK/WORLD_SIZE describe the real process layout
    env = discover({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "env")


def test_slurm():
    fake = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[007-009,012],login1"}
    env = discover(fake)
    assert env == DistEnv(5, 8, 1, "gpu007", 15000 + 4242 % 20000, "slurm")
    # the step's task count and an explicit master win
    env = discover({**fake, "SLURM_STEP_NUM_TASKS": "6", "MASTER_ADDR": "head", "MASTER_PORT": "7"})
    assert (env.world_size, env.master_addr, env.master_port) == (6, "head", 7)


def test_slurm_nodelist():
    assert expand_slurm_nodelist("n1") == ["n1"]
    assert expand_slurm_nodelist("gpu[01-03,10],cpu7") == ["gpu01", "gpu02", "gpu03", "gpu10", "cpu7"]
    assert expand_slurm_nodelist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    with pytest.raises(ValueError, match="bad range"):
        expand_slurm_nodelist("gpu[05-02]")


def test_mpi_uses_the_communicator():
    class FakeComm:  # what mpi4py's COMM_WORLD offers; rank 1 of 2, rank 0 broadcast its address
        def Get_rank(self): return 1
        def Get_size(self): return 2
        def bcast(self, obj, root): return ("10.1.1.1", 4567)
        def allgather(self, obj): return ["nodeA", obj]
    env = discover({"PMI_RANK": "1"}, mpi_comm=FakeComm())
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.launcher) == \
        (1, 2, "10.1.1.1", 4567, "mpi")


def test_single_process_gets_a_port():
    env = discover({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


@pytest.mark.parametrize("bad, match", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
                                        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
                                        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST")])
def test_bad_env_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        discover(bad)


def test_export_sets_torch_env_vars():
    out = {}
    DistEnv(1, 2, 1, "h", 99, "slurm").export(out)
    assert out == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99"}
