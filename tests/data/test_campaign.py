"""Mixtures, remote shards and the seq_len schedule together in a real run: a local source and a loopback-S3 source
(moto) under a two-stage schedule, DP 2, killed with SIGKILL mid-run twice (once in each stage) and resumed, consume
exactly the planned windows: every step's per-source token counts (metrics.jsonl) and the final loader state equal
the plan's, so no window was lost or read twice across the kills and the stage change (test_mixture.py counts the
tokens of a seq_len change one by one); and the run is bitwise the uninterrupted one (losses, grad norms and the
final checkpoint, tensor by tensor): a resume inside either stage changes nothing.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_campaign.py        (slow: four 2-rank launches, ~2-3 min)
"""
import os

import pytest
import torch

from megatrain.data import ShardStream
from megatrain.data.mixture import Source
from megatrain.train.checkpoint import read_latest, tag_for
from megatrain.train.metrics import read_metrics
from tests.data.servers import s3_server, upload
from tests.dist_util import launch_pretrain, wait_all
from tests.tiny_data import TINY, write_shards
from tests.train.test_resume import checkpoint_differences, kill_all, run_until

STEPS = 8
STAGES = [[0, 32], [3, 64]]     # tiny.yaml: micro_batch 2 x 32 tokens; stage 2: micro_batch 1 x 64 tokens
DP = 2


@pytest.mark.slow
def test_local_and_s3_mixture_under_a_schedule_killed_and_resumed(tmp_path):
    web = write_shards(str(tmp_path / "web"), n_docs=60, seed=0)
    os.makedirs(tmp_path / "books")
    write_shards(str(tmp_path / "books"), n_docs=25, seed=1)
    run, ref = tmp_path / "run", tmp_path / "ref"
    run.mkdir(), ref.mkdir()
    with s3_server():
        upload(str(tmp_path / "books"), "s3://campaign/books/")
        sources = [Source("web", web, 2.0), Source("books", "s3://campaign/books/index.json", 1.0)]
        args = ["--config", TINY, "data.shards=", f"run_dir={run}", f"train.max_steps={STEPS}",
                "data.sources=[" + ", ".join(f"{{name: {s.name}, shards: '{s.shards}', weight: {s.weight}}}"
                                             for s in sources) + "]",
                f"data.seq_len_schedule={STAGES}", "checkpoint.every_steps=2", "logging.tensorboard=false",
                "parallel.zero_stage=1", "data.retry_backoff_s=0.1"]
        wait_all(launch_pretrain([a.replace(str(run), str(ref)) for a in args], DP, str(ref)), 300, str(ref))
        procs = launch_pretrain(args, DP, str(run))
        run_until(procs, str(run), 3)
        kill_all(procs)  # after step 3: the newest whole checkpoint is step 2, inside stage 1 (steps 0-2)
        procs = launch_pretrain(args, DP, str(run))
        run_until(procs, str(run), 6)
        kill_all(procs)  # after step 6: step 4 (or 6 if its save ended), inside stage 2
        wait_all(launch_pretrain(args, DP, str(run)), 300, str(run))
        plan = ShardStream(sources=sources, seq_len=32, loop=True).plan  # the windows the run must have used
    log = open(run / "rank0.log").read()
    resumes = [line for line in log.splitlines() if line.startswith("resume: from")]
    assert len(resumes) == 2 and "stage 2/2 (seq_len 64)" in log, resumes
    assert resumes[0].startswith(f"resume: from {run / 'checkpoints' / tag_for(2)}"), resumes  # inside stage 1
    want = []
    for step in range(STEPS):
        seq_len = 32 if step < 3 else 64
        for _ in range(DP * (2 if step < 3 else 1)):  # windows per step: DP x micro_batch (accumulation 1)
            plan.take(seq_len)
        want.append({n: st.tokens for n, st in zip(plan.names, plan.states)})
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ref_rows = read_metrics(str(ref / "metrics.jsonl"))  # bitwise: == on floats
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in rows] == [(r["loss"], r["grad_norm"], r["lr"])
                                                                     for r in ref_rows]
    tag = read_latest(str(run / "checkpoints"))
    assert tag == read_latest(str(ref / "checkpoints"))
    assert checkpoint_differences(str(ref / "checkpoints"), str(run / "checkpoints"), tag) == []
    assert [{n: r[f"data/{n}/tokens"] for n in ("web", "books")} for r in rows] == want
    assert all(r["tokens"] == r["step"] * DP * 64 for r in rows)  # tokens per step unchanged across the stages
    assert [r["data/web/epoch"] for r in rows] == [0] * STEPS  # epochs are logged per source
    loader = torch.load(run / "checkpoints" / read_latest(str(run / "checkpoints")) / "trainer_rank00000.pt",
                        weights_only=False)["loader"]
    assert loader["position"] == plan.position and loader["tokens"] == plan.tokens == STEPS * DP * 64
    for name, st in plan.to_state().items():
        assert {k: loader["sources"][name][k] for k in st} == st, name
