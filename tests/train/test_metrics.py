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



def _flops(objective: str):
    """One training forward/backward of a small model under torch's FlopCounterMode (matmuls: mm, addmm, bmm):
    (forward FLOPs per module, the step's FLOPs, the blocked EMAs' own step FLOPs, model, config, tokens)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatrain.config import load_config
    from megatrain.model import build_model
    # wide enough that norms/biases/EMA parameters are ~2% of the weights, chunks long enough that attention shows
    cfg = load_config(TINY, ["data.shards=x", f"train.objective={objective}", "model.hidden_size=128",
                             "model.shared_representation_size=64", "model.intermediate_size=256",
                             "model.nffn_hidden_size=256", "model.vocab_size=256", "model.chunk_size=64",
                             "model.max_positions=128", "model.ema_block_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    ids = torch.randint(5, 256, (2, 128))
    # the protocol's forward kwargs, but with logits: the fused head's in-place addmm_ (its weight gradient) is
    # not in FlopCounterMode's table, the plain head is; both do the same 6 x V x D per token
    kw = dict(labels=ids, loss_reduction="sum", return_logits=True,
              **({"labels_shifted": True} if objective == "clm" else {}))
    fwd = FlopCounterMode(display=False, depth=None)
    with fwd:
        model(input_ids=ids, **kw)
    step = FlopCounterMode(display=False)
    with step:
        model(input_ids=ids, **kw).loss.backward()
    ema = FlopCounterMode(display=False)  # an EMA's FLOPs depend on shapes only: each layer's alone, same input
    with ema:
        for layer in model.mega.layers:
            x = torch.randn(2, 128, cfg.model.hidden_size, requires_grad=True)
            layer.attn.ema(x)[0].sum().backward()
    per_module = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items()}
    return per_module, step.get_total_flops(), ema.get_total_flops(), model, cfg, ids.numel()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_model_flops_match_flop_counter(objective):
    """MFU's formula against what the train step's matmuls do (FlopCounterMode, CPU):
    * forward, per module: the projections (every nn.Linear but the head) are 2 x weights per token and the
      attention's own matmuls 2 x span x (qk + v) per layer: the formula's terms exactly (causal: twice the
      formula's half, the kernel computes whole chunks);
    * the whole step minus the blocked EMA's own matmuls (measured beside, not in MFU) is 6 x the matmul weights
      (head included) + the attention term, within 1%; the formula's 6 x params counts all parameters, within 3%
      of the matmul weights here (norms, biases, EMA parameters: ~2% of them)."""
    import torch

    from megatrain.train.metrics import model_flops_per_token, run_flops
    fwd, step_total, ema_total, model, cfg, tokens = _flops(objective)
    m, causal = cfg.model, objective == "clm"
    layers = [f"{type(model).__name__}.mega.layers.{i}.attn" for i in range(m.num_hidden_layers)]
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    weights = sum(mod.weight.numel() for mod in linears.values())
    proj = sum(v for k, v in fwd.items() if k.split(".", 1)[-1] in linears and not k.endswith("lm_head"))
    assert proj == 2 * tokens * (weights - linears["lm_head"].weight.numel())
    attention = sum(fwd[a] - fwd[f"{a}.ema"] - fwd[f"{a}.rel_pos"] -
                    sum(fwd[f"{a}.{p}"] for p in ("v_proj", "mx_proj", "h_proj")) for a in layers)
    attn_term = model_flops_per_token(0, m.num_hidden_layers, m.chunk_size, m.shared_representation_size,
                                      m.intermediate_size, causal=causal)
    assert 3 * attention == pytest.approx(attn_term * tokens * (2 if causal else 1), rel=1e-9)
    computed = 6 * weights + attn_term * (2 if causal else 1)
    measured = (step_total - ema_total) / tokens
    assert measured == pytest.approx(computed, rel=0.01), (measured, computed)
    formula, _ = run_flops(cfg, model)
    assert formula - attn_term == pytest.approx(6 * weights, rel=0.03)
    print(f"{objective}: FLOPs/token: step {step_total / tokens:.0f} = matmul weights {6 * weights} + attention "
          f"{attn_term * (2 if causal else 1):.0f} + blocked EMA {ema_total / tokens:.0f} "
          f"({100 * ema_total / step_total:.1f}%, not in MFU) (+ {measured - computed:+.0f}); MFU formula "
          f"{formula:.0f}")
