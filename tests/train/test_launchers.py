"""The same job under every launcher: the deepspeed launcher, torchrun, mpiexec (pip's mpich + mpi4py) and one
plain process. Each 2-rank launch runs SP 2 and must reproduce the plain single-process losses.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_launchers.py
"""
import os
import shutil
import subprocess
import sys

import pytest

from megatrain.train.metrics import read_metrics
from tests.train.conftest import TINY
from tests.train.dist_util import PRETRAIN, ROOT, free_port, pretrain_env

LAUNCHERS = {
    "single": lambda port: [sys.executable, PRETRAIN],
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), PRETRAIN],
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), PRETRAIN],
    "mpi": lambda port: ["mpiexec", "-n", "2", sys.executable, PRETRAIN],
}


def launch(tmp_path, name, shards):
    d = tmp_path / name
    cmd = LAUNCHERS[name](free_port()) + [
        "--config", TINY, f"data.shards={shards}", f"run_dir={d}", "train.max_steps=2", "logging.tensorboard=false",
        *([] if name == "single" else ["parallel.sequence_parallel_size=2"])]
    env = pretrain_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launcher must provide them
    if name == "mpi":  # rendezvous port chosen by rank 0 and broadcast over MPI: none given here
        env.pop("MASTER_PORT", None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert f"launcher={ {'single': 'single', 'deepspeed': 'env', 'torchrun': 'torchrun', 'mpi': 'mpi'}[name]} " \
        in p.stdout + p.stderr
    return read_metrics(os.path.join(d, "metrics.jsonl"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_shards):
    return launch(tmp_path_factory.mktemp("single"), "single", tiny_shards)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepspeed", "torchrun", "mpi"])
def test_launcher(tmp_path, tiny_shards, single, name):
    if shutil.which(LAUNCHERS[name](0)[0]) is None:
        pytest.skip(f"{name} launcher not installed")
    got = launch(tmp_path, name, tiny_shards)
    assert [r["step"] for r in got] == [1, 2]
    for g, s in zip(got, single):
        assert g["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=0)


def test_bad_config_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, "data.shards=x", "train.lrr=1"], cwd=ROOT,
                       env=pretrain_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("pretrain: error: unknown config key 'train.lrr'")
    assert "Traceback" not in p.stderr
