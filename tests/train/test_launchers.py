"""The same job under every launcher: the deepspeed launcher, torchrun, mpiexec (pip's mpich + mpi4py) and one
plain process. Each 2-rank launch runs SP 2 (ZeRO 0) and must reproduce the plain single-process (ZeRO 1) losses.
Multi-node on one machine: two launcher invocations, one per "node" (node rank 0 and 1, rendezvous on 127.0.0.1),
with torchrun (--nnodes 2 --node_rank N) and with the deepspeed launcher (a two-host hostfile, --no_ssh
--node_rank N: each node starts its own ranks, no pdsh/ssh) reproduce the same losses.
The single run's outputs (metrics, TensorBoard, resolved config, checkpoint) are checked, and its ZeRO checkpoint
is exported to a Hugging Face folder that transformers loads with the same logits.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_launchers.py
"""
import os
import subprocess
import sys

import pytest

from megatrain.parallel.env import find_launcher
from megatrain.train.metrics import read_metrics
from tests.tiny_data import TINY
from tests.dist_util import PRETRAIN, ROOT, free_port, pretrain_env, wait_all

LAUNCHERS = {
    "single": lambda port: [sys.executable, PRETRAIN],
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), PRETRAIN],
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), PRETRAIN],
    "mpi": lambda port: ["mpiexec", "-n", "2", sys.executable, PRETRAIN],
}


def launch(tmp_path, name, shards):
    d = tmp_path / name
    cmd = LAUNCHERS[name](free_port()) + [
        "--config", TINY, f"data.shards={shards}", f"run_dir={d}", "train.max_steps=2",
        *(["parallel.zero_stage=1"] if name == "single" else
          ["parallel.sequence_parallel_size=2", "logging.tensorboard=false"])]
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
def single_dir(tmp_path_factory, tiny_shards):
    d = tmp_path_factory.mktemp("single")
    launch(d, "single", tiny_shards)
    return d / "single"


@pytest.fixture(scope="module")
def single(single_dir):
    return read_metrics(os.path.join(single_dir, "metrics.jsonl"))


def test_single_process_outputs(single_dir, single):
    assert [sorted(r) for r in single] == [sorted(["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                                                    "skipped_steps", "tflops"])] * 2
    assert single[1]["tokens"] == 2 * 2 * 32 and single[0]["lr"] == pytest.approx(1.5e-3)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(single_dir / "tensorboard"))
    from megatrain.config import load_config
    assert load_config(str(single_dir / "config.yaml")).train.max_steps == 2  # the resolved config
    assert open(single_dir / "checkpoints" / "latest").read() == "step00000002"


def test_export_hf_matches_transformers(single_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from megatrain.export.load import load_model
    out = tmp_path / "hf"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export_hf.py"),
                        str(single_dir / "checkpoints"), str(out), "--no-tokenizer"],  # synthetic shards: none
                       env=pretrain_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, cfg = load_model(str(single_dir / "checkpoints"))  # ZeRO-1 shards merged by zero_to_fp32
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    x = torch.randint(8, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepspeed", "torchrun", "mpi"])
def test_launcher(tmp_path, tiny_shards, single, name):
    # the dev extras install all three (deepspeed, torch's torchrun, pip's mpich): missing is a failure, not a skip
    assert find_launcher(LAUNCHERS[name](0)[0]), f"{name} launcher not found: pip install -e '.[dev]'"
    got = launch(tmp_path, name, tiny_shards)
    assert [r["step"] for r in got] == [1, 2]
    for g, s in zip(got, single):
        assert g["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=0)


TWO_NODES = {  # one command per node; 1 process per node
    "torchrun": lambda node, port, hostfile: ["torchrun", "--nnodes", "2", "--node_rank", str(node),
                                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                                              "--master_port", str(port), PRETRAIN],
    "deepspeed": lambda node, port, hostfile: ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank",
                                               str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                                               PRETRAIN],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWO_NODES))
def test_two_nodes_on_one_machine(tmp_path, tiny_shards, single, name):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only label the nodes: nothing connects to them
    env = pretrain_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launchers must provide them
    d, port = tmp_path / "run", free_port()
    procs = [subprocess.Popen(TWO_NODES[name](node, port, str(hostfile)) + [
        "--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}", "train.max_steps=2",
        "parallel.sequence_parallel_size=2", "logging.tensorboard=false"], cwd=ROOT, env=env,
        stdout=open(tmp_path / f"node{node}.log", "w"), stderr=subprocess.STDOUT) for node in (0, 1)]
    wait_all(procs, 300, str(tmp_path))
    assert "world=2" in (tmp_path / "node0.log").read_text()  # one job of 2 ranks, not two jobs of 1
    got = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [g["step"] for g in got] == [1, 2]
    assert [g["loss"] for g in got] == pytest.approx([s["loss"] for s in single], rel=1e-6, abs=0)


@pytest.mark.slow
def test_slurm_environment(tmp_path, tiny_shards, single):
    """What `srun` from launch/slurm/pretrain.sbatch gives each task: SLURM_* and the exported MASTER_PORT, no
    RANK/WORLD_SIZE/MASTER_ADDR: ranks and the master host come from env.py."""
    d = tmp_path / "slurm"
    d.mkdir()
    procs, port = [], str(free_port())
    for r in range(2):
        env = pretrain_env()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(k, None)
        env.update({"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                    "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "MASTER_PORT": port})
        procs.append(subprocess.Popen(
            [sys.executable, PRETRAIN, "--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}",
             "train.max_steps=2", "logging.tensorboard=false", "parallel.sequence_parallel_size=2"],
            cwd=ROOT, env=env, stdout=open(d / f"rank{r}.log", "w"), stderr=subprocess.STDOUT))
    wait_all(procs, 150, str(d))
    assert "launcher=slurm world=2" in open(d / "rank0.log").read()
    got = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [g["loss"] for g in got] == pytest.approx([s["loss"] for s in single], rel=1e-6, abs=0)


@pytest.mark.slow
def test_bf16_tracks_fp32(tmp_path, tiny_shards, single):
    """precision=bf16 (DeepSpeed bf16: bf16 weights/activations, fp32 master weights; EMA math in fp32) under
    ZeRO-2 stays within bf16 noise of the fp32 run."""
    d = tmp_path / "bf16"
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}",
                        "train.max_steps=2", "train.precision=bf16", "parallel.zero_stage=2",
                        "logging.tensorboard=false"], cwd=ROOT, env=pretrain_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [g["loss"] for g in got] == pytest.approx([s["loss"] for s in single], rel=1e-2)
    assert all(g["grad_norm"] == pytest.approx(s["grad_norm"], rel=5e-2) for g, s in zip(got, single))


def test_sbatch_script_is_valid_bash():
    script = os.path.join(ROOT, "launch", "slurm", "pretrain.sbatch")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "srun" in text and "--signal=USR1@" in text and "launch/pretrain.py" in text


def test_bad_config_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, "data.shards=x", "train.lrr=1"], cwd=ROOT,
                       env=pretrain_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("pretrain: error: unknown config key 'train.lrr'")
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={tmp_path}/none/index.json"],
                       cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pretrain: error: data.shards=" in p.stderr and "no such file" in p.stderr
    from tests.tiny_data import write_shards
    shards = write_shards(str(tmp_path / "shards"))
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={shards}",
                        "model.vocab_size=48", f"run_dir={tmp_path}/run"], cwd=ROOT, env=pretrain_env(),
                       capture_output=True, text=True, timeout=120)  # shards built for vocab 64
    assert p.returncode == 2 and "pretrain: error: data.shards=" in p.stderr and "vocab_size=48" in p.stderr
    assert "Traceback" not in p.stderr
