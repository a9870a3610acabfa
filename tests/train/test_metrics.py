"""The console of a run: one plain progress line per logging step (step/total, loss, tok/s, elapsed<ETA), a
closing line naming the outputs, and none of the start-up noise megatrain used to let through (DeepSpeed's
accelerator guess, its "untested optimizer" warning that our own config switched on, torch's deprecation warnings
for the collectives DeepSpeed's ZeRO-3 calls).

Run: PYTHONPATH=. python -m pytest -q tests/train/test_metrics.py
"""
import io
import os
import re
import subprocess
import sys

import pytest

from megatrain.train.metrics import MetricsLogger, eta_seconds
from tests.tiny_data import TINY
from tests.dist_util import PRETRAIN, ROOT, pretrain_env

PROGRESS = re.compile(r"^step (\d+)/(\d+) \(\d+%\) \| loss \d+\.\d{4} \| lr \S+ \| gnorm \S+ \| tok/s \d+ \| "
                      r"skipped \d+ \| (\d\d:\d\d)<(\d\d:\d\d)$")


def test_eta_is_remaining_steps_times_mean_step_time():
    # first step logged at t=10 after starting at t=4: alone it is the estimate (6 s a step)
    assert eta_seconds(1, 5, first_step=1, t_first=10.0, now=10.0, t_start=4.0) == 4 * 6.0
    # later: the mean over the steps after the first (the slow one), 2 s a step
    assert eta_seconds(4, 10, first_step=1, t_first=10.0, now=16.0, t_start=4.0) == 6 * 2.0
    # a resumed run counts from its own first step; a finished one has nothing left
    assert eta_seconds(12, 20, first_step=11, t_first=0.0, now=3.0, t_start=-1.0) == 8 * 3.0
    assert eta_seconds(20, 20, first_step=11, t_first=0.0, now=3.0, t_start=-1.0) == 0


def test_progress_lines_every_n_steps_and_the_last(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, print_every=2, stream=out, total_steps=5)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": None, "tokens": 64 * step,
                 "tokens_per_s": 640.0, "skipped_steps": 0})
    log.close()
    lines = out.getvalue().splitlines()
    assert [PROGRESS.match(x).group(1) for x in lines] == ["2", "4", "5"], lines
    assert "\r" not in out.getvalue() and "gnorm nan" in lines[0]


@pytest.mark.slow
def test_console_of_a_run(tmp_path, tiny_shards):
    """ZeRO-3 on CPU, 3 steps, a line every 2: everything the process writes to stdout+stderr (a log file, not a
    tty) is the banner, progress lines for steps 2 and 3, and the closing line; no start-up warnings we removed."""
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}",
                        "train.max_steps=3", "parallel.zero_stage=3", "logging.every_steps=2"],
                       cwd=ROOT, env=pretrain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    text = p.stdout.decode(errors="replace")
    assert p.returncode == 0, text[-3000:]
    assert "\r" not in text
    for noise in ("Setting accelerator to CPU", "untested optimizer", "FutureWarning", "is deprecated"):
        assert noise not in text, f"{noise!r} in:\n{text}"
    lines = text.splitlines()
    progress = [m for m in map(PROGRESS.match, lines) if m]
    assert [(m.group(1), m.group(2)) for m in progress] == [("2", "3"), ("3", "3")], text
    assert progress[-1].group(4) == "00:00"  # ETA at the last step
    assert lines[-1] == (f"megatrain: done at step 3/3 | run_dir {d} | metrics {d}/metrics.jsonl | "
                         f"checkpoint {d}/checkpoints/step00000003 | tensorboard {d}/tensorboard"), text
    assert os.path.exists(d / "metrics.jsonl") and os.path.isdir(d / "tensorboard")
