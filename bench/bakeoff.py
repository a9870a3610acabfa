"""Does it learn? MEGA (and Megalodon) trained by megatrain against a same-size Llama on the same tokens.

Run (the results folder is resumable: run the same command again after a kill; finished runs are kept):
    python bench/bakeoff.py --data shards/ --archs mega,llama --preset cpu-small \\
        --out bench/results/bakeoff-demo-2026-12-05/ [--seeds 3] [--lrs auto|1e-3,3e-3] [--init-ranges auto|0.02,0.1]
        [--seq-len 1024] [--tokens N] [--tokenizer TOK_DIR] [--threads 1] [--set mega.chunk_size=128 ...]
    nohup nice -n 10 python bench/bakeoff.py ... > bakeoff.log 2>&1 &      # a long sweep on a shared machine
--data: a data_tools/build_shards.py output with a held-out split (DIR/index.json, DIR/heldout/index.json).
--tokenizer: its tokenizer folder, for the passkey sweep (default: none -> no passkey).

What every arch gets (bench/bakeoff_archs.py has the registry; an arch is a few lines):
  * the same tokens: megatrain's ShardStream (seed = the run's seed, one rank, its default lanes), the same
    windows in the same order for every arch; a sha256 of every step's input_ids/labels/doc_ids is recorded per run
    and the harness refuses to write results when two arches of one seed saw different streams;
  * the same optimizer and schedule: megatrain's build_optimizer (AdamW, beta2 0.95, megatrain's decay grouping,
    weight decay 0.01, clipping 1.0 in GuardedAdamW) and build_scheduler (linear warmup 5% of the steps, cosine to
    10%), the same tokens per step and steps;
  * the same size: the Llama's FFN width is chosen so its non-embedding parameters are within 5% of MEGA's;
  * fair tuning: phase 1 sweeps the LR grid (and, for MEGA, initializer_range) at seed 0; phase 2 runs the best
    setting per arch (lowest held-out loss at the end of training) at seeds 1 .. --seeds - 1;
  * the same measurement: megatrain's evaluation (megatrain.eval) on the held-out split, the same windows for every
    arch: a held-out loss curve during training, then loss / ppl / bits per byte at 1x, 2x, 4x the training
    length, loss by position (log bins) and a passkey sweep for the best setting's runs; training tokens/s.
One training loop for every arch, in this process (no DeepSpeed), through megatrain's one window forward
(megatrain.parallel.protocol.sp_forward_backward), fp32 on CPU, bf16 autocast on CUDA.
Output in --out: runs/<run>/train.json (config, curve, digest, speed) and eval.json, weights/ (gitignored),
results.json (everything), README.md (tables), loss_curve.png, loss_by_position.png, passkey.png.
Tests: PYTHONPATH=. python -m pytest -q tests/bench/test_bakeoff.py     (the cpu-tiny preset end to end)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser  # noqa: E402

def _gpu_preset(d: int, layers: int, z: int, seq_len: int, windows_per_step: int, steps: int, lrs: list) -> dict:
    """A GPU preset: MEGA of width d (FFN 2d, chunk 2048), the initializer_range grid {0.02, d^-1/2}."""
    return dict(shape=dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d,
                           shared_representation_size=z, nffn_hidden_size=2 * d, ema_projection_size=16,
                           chunk_size=2048, head_dim=64),
                seq_len=seq_len, windows_per_step=windows_per_step, tokens=seq_len * windows_per_step * steps,
                lrs=lrs, init_ranges=[0.02, d ** -0.5], curve_points=10, curve_tokens=262144, eval_tokens=524288,
                passkey_trials=20, passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], device="cuda")


# Presets: the MEGA shape (the Llama is sized to it), the training length and budget, the tuning grids and the
# evaluation sizes. tokens = training tokens per run (steps = tokens // (seq_len x windows per step)).
PRESETS = {
    # a test: seconds per run
    "cpu-tiny": dict(
        shape=dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, shared_representation_size=16,
                   nffn_hidden_size=64, ema_projection_size=4, chunk_size=16),
        seq_len=128, windows_per_step=2, tokens=128 * 2 * 24, lrs=[3e-3, 1e-2], init_ranges=[0.02, 0.1],
        curve_points=3, curve_tokens=256, eval_tokens=512, passkey_trials=2, passkey_depths=[0.0, 1.0],
        device="cpu"),
    # 1.3M non-embedding parameters (the demo's MEGA shape, 6 layers instead of 4), 600 steps x 1024 tokens per
    # run (~4-5 min on one free core; a sweep of one corpus at 3 seeds, 11 runs + evaluation, ~1 h). The committed
    # results (bench/results/bakeoff-*-2026-12-05) ran --tokens 262144 --seeds 2 on a loaded machine.
    "cpu-small": dict(
        shape=dict(hidden_size=128, num_hidden_layers=6, intermediate_size=256, shared_representation_size=64,
                   nffn_hidden_size=256, ema_projection_size=16, chunk_size=128),
        seq_len=1024, windows_per_step=1, tokens=1024 * 600, lrs=[1e-3, 3e-3, 1e-2], init_ranges=[0.02, 128 ** -0.5],
        curve_points=8, curve_tokens=16384, eval_tokens=16384, passkey_trials=5,
        passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], device="cpu"),
    # the anchors' scale (configs/mega125m_32k.yaml, configs/mega350m_128k.yaml shapes), for a lent GPU
    "gpu-125m": _gpu_preset(768, 14, 256, seq_len=8192, windows_per_step=8, steps=2000, lrs=[3e-4, 6e-4, 1.2e-3]),
    "gpu-350m": _gpu_preset(1024, 24, 256, seq_len=32768, windows_per_step=2, steps=3000, lrs=[2e-4, 4e-4, 8e-4]),
}
WEIGHT_DECAY = 0.01        # megatrain's TrainCfg default
WARMUP_FRACTION = 0.05
LENGTH_FACTORS = (1, 2, 4)  # evaluation lengths: x the training length
# what defines the runs of a results folder: a resume with other values is refused (archs and seeds may grow)
FIXED_KEYS = ("preset", "data", "seq_len", "tokens", "windows_per_step", "lrs", "init_ranges", "overrides")


# ---- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    arch: str
    lr: float
    init_range: float | None    # MEGA's initializer_range (None: the arch's own default)
    seed: int

    @property
    def name(self) -> str:
        ir = "" if self.init_range is None else f"-init{self.init_range:g}"
        return f"{self.arch}-lr{self.lr:g}{ir}-s{self.seed}"

    @property
    def setting(self) -> tuple:
        return (self.arch, self.lr, self.init_range)


def sweep_specs(archs, lrs, init_ranges) -> list:
    """Phase 1: every arch x LR (x initializer_range for MEGA-family archs) at seed 0."""
    out = []
    for arch in archs:
        inits = init_ranges if arch in INIT_SWEPT else [None]
        out += [RunSpec(arch, lr, ir, 0) for lr in lrs for ir in inits]
    return out


INIT_SWEPT = ("mega",)  # archs whose initializer_range is part of the sweep (issue #24); Megalodon keeps its
# reference init (fan-in scaled "he", already width-scaled: the question 0.02 vs D^-1/2 is MEGA's)


def best_setting(records: list, arch: str) -> tuple:
    """(lr, init_range) of the arch's seed-0 run with the lowest final held-out loss (ties: the smaller LR)."""
    mine = [r for r in records if r["spec"]["arch"] == arch and r["spec"]["seed"] == 0]
    if not mine:
        raise ValueError(f"no finished seed-0 run of {arch}")
    best = min(mine, key=lambda r: (_final(r), r["spec"]["lr"]))
    return best["spec"]["lr"], best["spec"]["init_range"]


def _final(rec: dict) -> float:
    loss = rec["curve"][-1]["loss"]
    return loss if math.isfinite(loss) else float("inf")


# ---- one run: the one training loop ------------------------------------------------------------------------------
def _device(preset: dict):
    import torch
    if preset["device"] == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("this preset needs a CUDA device (use cpu-small or cpu-tiny on CPU)")
        return torch.device("cuda")
    return torch.device("cpu")


def shape_of(preset: dict, seq_len: int) -> dict:
    return {**preset["shape"], "train_len": seq_len, "max_positions_total": seq_len * max(LENGTH_FACTORS),
            "max_positions": seq_len * max(LENGTH_FACTORS)}


def reference_params(preset, seq_len, vocab_size, overrides) -> int:
    """Non-embedding parameters of the reference arch (MEGA) at this preset: what the baselines match."""
    from bench.bakeoff_archs import REFERENCE, build_arch
    _, info = build_arch(REFERENCE, shape_of(preset, seq_len), vocab_size, overrides.get(REFERENCE, {}))
    return info["non_embedding_params"]


def build_for(spec: RunSpec, preset, seq_len, vocab_size, overrides, match, post_build=None):
    """(model, info) of a run, seeded by its seed; `post_build(model)` (controlled experiments: another
    initialisation of some parameters, bench/bakeoff_init.py) runs on the built model."""
    import torch

    from bench.bakeoff_archs import REFERENCE, build_arch
    torch.manual_seed(spec.seed)
    ov = dict(overrides.get(spec.arch, {}))
    if spec.init_range is not None:
        ov["initializer_range"] = spec.init_range
    model, info = build_arch(spec.arch, shape_of(preset, seq_len), vocab_size, ov,
                             None if spec.arch == REFERENCE else match)
    if post_build is not None:
        post_build(model)
    return model, info


def train_run(spec: RunSpec, data: str, preset: dict, seq_len: int, tokens: int, overrides: dict, match: int,
              weights_path: str | None = None, log=print, post_build=None) -> dict:
    """Train one run and return its record (config, curve, digest, speed); the weights go to `weights_path`."""
    import torch

    from megatrain.config import TrainCfg
    from megatrain.data import ShardStream
    from megatrain.eval.heldout import load_heldout
    from megatrain.eval.loss import evaluate_windows
    from megatrain.parallel.protocol import sp_forward_backward
    from megatrain.train.optim import build_optimizer, build_scheduler

    device = _device(preset)
    train_man, held_man = manifests(data)
    vocab = _vocab(train_man)
    model, info = build_for(spec, preset, seq_len, vocab, overrides, match, post_build)
    model.to(device).train()
    per_step = preset["windows_per_step"]
    steps = max(1, tokens // (seq_len * per_step))
    t = TrainCfg(max_steps=steps, seed=spec.seed, lr=spec.lr, warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
                 lr_schedule="cosine", weight_decay=WEIGHT_DECAY, grad_clip=1.0)
    opt = build_optimizer(model, t, guard=True)
    sched = build_scheduler(opt, t)
    stream = ShardStream(train_man, seq_len=seq_len, seed=spec.seed, vocab_size=vocab, loop=True)
    held = load_heldout(held_man, seq_len, preset["curve_tokens"], vocab_size=vocab, train_data=train_man,
                        key="--data heldout")
    every = max(1, steps // preset["curve_points"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    digest = hashlib.sha256()
    curve, losses, skipped, train_s = [], [], 0, 0.0
    it = iter(stream)
    for step in range(1, steps + 1):
        rows = [next(it) for _ in range(per_step)]
        batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "doc_ids")}
        for k in ("input_ids", "labels", "doc_ids"):
            digest.update(batch[k].numpy().astype("int64").tobytes())
        batch = {k: v.to(device) for k, v in batch.items()}
        t0 = time.perf_counter()
        with autocast:  # the one window forward (megatrain.parallel.protocol), one process: no SP group
            loss = sp_forward_backward(model, batch, None, causal=True).mean_loss
        opt.step()
        if opt.overflow:
            skipped += 1
        else:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        losses.append(float(loss))
        if step % every == 0 or step == steps:
            with autocast:
                ev = evaluate_windows(model, held, micro_batch_size=per_step).summary()
            curve.append({"step": step, "tokens": step * per_step * seq_len, "loss": ev["loss"], "bpb": ev["bpb"],
                          "train_loss": statistics.fmean(losses[-every:])})
            log(f"  {spec.name} step {step}/{steps} | train {curve[-1]['train_loss']:.4f} | held-out "
                f"{ev['loss']:.4f} | {step * per_step * seq_len / max(train_s, 1e-9):.0f} tok/s")
    it.close()
    if weights_path:
        os.makedirs(os.path.dirname(weights_path), exist_ok=True)
        torch.save(model.state_dict(), weights_path + ".tmp")
        os.replace(weights_path + ".tmp", weights_path)
    return {"spec": spec.__dict__, "name": spec.name, **info, "steps": steps, "tokens": steps * per_step * seq_len,
            "seq_len": seq_len, "windows_per_step": per_step, "train_config": dataclasses.asdict(t), "curve": curve,
            "skipped_steps": skipped, "train_seconds": train_s, "train_tokens_per_s": steps * per_step * seq_len
            / max(train_s, 1e-9), "stream_sha256": digest.hexdigest(), "threads": torch.get_num_threads(),
            "device": str(device)}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def eval_run(spec: RunSpec, rec: dict, data: str, preset: dict, overrides: dict, match: int, weights_path: str,
             tokenizer: str | None) -> dict:
    """megatrain's standalone evaluation of a trained run: 1x/2x/4x rows, by position, passkey."""
    import torch

    from megatrain.eval.standalone import evaluate_model
    train_man, held_man = manifests(data)
    seq_len = rec["seq_len"]
    model, _ = build_for(spec, preset, seq_len, _vocab(train_man), overrides, match)
    model.load_state_dict(torch.load(weights_path, map_location="cpu"))
    model.to(_device(preset)).eval()
    lengths = [seq_len * f for f in LENGTH_FACTORS]
    fmt = None
    if tokenizer:
        from megatrain.data.tokenizer import load_tokenizer
        from megatrain.eval.passkey import PasskeyFormat
        fmt = PasskeyFormat.from_tokenizer(load_tokenizer(tokenizer))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if _device(preset).type == "cuda" else _nullcontext()
    with autocast:
        res = evaluate_model(model, held_man, lengths, preset["eval_tokens"], micro_batch_size=1, positions=True,
                             passkey_format=fmt, passkey_lengths=lengths, passkey_trials=preset["passkey_trials"],
                             passkey_depths=preset["passkey_depths"], show_progress=False)
    return res


# ---- data --------------------------------------------------------------------------------------------------------
def manifests(data: str) -> tuple[str, str]:
    train = data if data.endswith(".json") else os.path.join(data, "index.json")
    held = os.path.join(os.path.dirname(train), "heldout", "index.json")
    for path, what in ((train, "index.json"), (held, "heldout/index.json")):
        if not os.path.isfile(path):
            raise ValueError(f"--data {data}: no {what} (a data_tools/build_shards.py output with "
                             f"--heldout-fraction or --heldout-docs)")
    return train, held


def _vocab(manifest: str) -> int:
    from megatrain.data.shards import Manifest
    return Manifest.load(manifest).vocab_size


def data_fingerprint(data: str) -> dict:
    from megatrain.data.shards import Manifest
    train, held = manifests(data)
    a, b = Manifest.load(train), Manifest.load(held)
    return {"train_tokens": a.tokens, "train_docs": a.docs, "heldout_tokens": b.tokens, "heldout_docs": b.docs,
            "vocab_size": a.vocab_size, "tokenizer_sha256": a.tokenizer_sha256}


# ---- the sweep ---------------------------------------------------------------------------------------------------
def _read(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def run_sweep(a, preset: dict, log=print) -> dict:
    out = a.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".gitignore"), "w") as f:
        f.write("weights/\n*.tmp\n")
    fixed = {"preset": a.preset, "data": data_fingerprint(a.data), "seq_len": a.seq_len, "tokens": a.tokens,
             "windows_per_step": preset["windows_per_step"], "lrs": a.lrs, "init_ranges": a.init_ranges,
             "overrides": a.overrides}
    plan_path = os.path.join(out, "bakeoff.json")
    old = _read(plan_path)
    if old is not None:
        diff = [k for k in FIXED_KEYS if old["fixed"].get(k) != fixed[k]]
        if diff:
            raise ValueError(f"--out {out}: holds a sweep with other {', '.join(diff)} (was "
                             f"{', '.join(k + '=' + str(old['fixed'].get(k)) for k in diff)}); use a new --out")
    _write(plan_path, {"fixed": fixed, "archs": a.archs, "seeds": a.seeds})
    match = reference_params(preset, a.seq_len, fixed["data"]["vocab_size"], a.overrides)

    def do(spec: RunSpec) -> dict:
        path = os.path.join(out, "runs", spec.name, "train.json")
        rec = _read(path)
        if rec is None:
            log(f"train {spec.name}")
            rec = train_run(spec, a.data, preset, a.seq_len, a.tokens, a.overrides, match,
                            os.path.join(out, "weights", spec.name + ".pt"), log=log)
            _write(path, rec)
        return rec

    records = [do(s) for s in sweep_specs(a.archs, a.lrs, a.init_ranges)]
    best = {arch: best_setting(records, arch) for arch in a.archs}
    for arch, (lr, ir) in best.items():
        records += [do(RunSpec(arch, lr, ir, s)) for s in range(1, a.seeds)]
    evals = {}
    for arch, (lr, ir) in best.items():
        for s in range(a.seeds):
            spec = RunSpec(arch, lr, ir, s)
            path = os.path.join(out, "runs", spec.name, "eval.json")
            ev = _read(path)
            if ev is None:
                log(f"evaluate {spec.name}")
                rec = next(r for r in records if r["name"] == spec.name)
                ev = eval_run(spec, rec, a.data, preset, a.overrides, match,
                              os.path.join(out, "weights", spec.name + ".pt"), a.tokenizer)
                _write(path, ev)
            evals[spec.name] = ev
    check_same_streams(records)
    results = summarize(records, evals, best, fixed, a)
    results["command"] = getattr(a, "command", None)
    results["speed"] = _read(os.path.join(out, "speed.json"))
    _write(os.path.join(out, "results.json"), results)
    from bench.bakeoff_report import write_report
    write_report(results, out)
    log(f"wrote {os.path.join(out, 'results.json')}, README.md and plots")
    return results


def speed_run(a, preset: dict, steps: int, log=print) -> dict:
    """Training tokens/s of every arch in one process, interleaved step by step on the same windows (so a busy
    machine slows them alike): wall clock and per CPU-second of this process; the first step of each is a warm-up.
    Written to OUT/speed.json (the report shows it)."""
    import torch

    from megatrain.config import TrainCfg
    from megatrain.data import ShardStream
    from megatrain.parallel.protocol import sp_forward_backward
    from megatrain.train.optim import build_optimizer, build_scheduler
    train_man, _ = manifests(a.data)
    vocab = _vocab(train_man)
    match = reference_params(preset, a.seq_len, vocab, a.overrides)
    device = _device(preset)
    t = TrainCfg(max_steps=steps + 1, lr=1e-3, warmup_steps=1, grad_clip=1.0)
    runs = {}
    for arch in a.archs:
        model, _ = build_for(RunSpec(arch, 1e-3, None, 0), preset, a.seq_len, vocab, a.overrides, match)
        model.to(device).train()
        opt = build_optimizer(model, t, guard=True)
        runs[arch] = [model, opt, build_scheduler(opt, t), 0.0, 0.0]
    it = iter(ShardStream(train_man, seq_len=a.seq_len, seed=0, vocab_size=vocab, loop=True))
    per_step = preset["windows_per_step"]
    for step in range(steps + 1):
        rows = [next(it) for _ in range(per_step)]
        batch = {k: torch.stack([r[k] for r in rows]).to(device) for k in ("input_ids", "labels", "doc_ids")}
        for arch, r in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            sp_forward_backward(r[0], batch, None, causal=True)
            r[1].step()
            r[2].step()
            r[1].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step warms up
                r[3] += time.perf_counter() - w0
                r[4] += time.process_time() - c0
    tokens = steps * per_step * a.seq_len
    res = {"steps": steps, "tokens": tokens, "seq_len": a.seq_len, "threads": torch.get_num_threads(),
           "load_average": list(os.getloadavg()), "archs": {
               arch: {"tokens_per_s": tokens / r[3], "tokens_per_cpu_s": tokens / r[4]} for arch, r in runs.items()}}
    for arch, v in res["archs"].items():
        log(f"speed {arch}: {v['tokens_per_s']:.0f} tok/s wall, {v['tokens_per_cpu_s']:.0f} tok/CPU-s")
    os.makedirs(a.out, exist_ok=True)
    _write(os.path.join(a.out, "speed.json"), res)
    return res


def check_same_streams(records: list) -> None:
    """Every run of one seed read the same token stream (same windows, same order): one digest per seed."""
    by_seed = {}
    for r in records:
        by_seed.setdefault(r["spec"]["seed"], {}).setdefault(r["stream_sha256"], []).append(r["name"])
    for seed, digests in by_seed.items():
        if len(digests) > 1:
            raise RuntimeError(f"seed {seed}: runs read different token streams: {digests}")


def _ms(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(records, evals, best, fixed, a) -> dict:
    arch_rows = {}
    for arch, (lr, ir) in best.items():
        runs = [r for r in records if (r["spec"]["arch"], r["spec"]["lr"], r["spec"]["init_range"]) == (arch, lr, ir)]
        runs.sort(key=lambda r: r["spec"]["seed"])
        evs = [evals[r["name"]] for r in runs if r["name"] in evals]
        row = {"lr": lr, "init_range": ir, "seeds": [r["spec"]["seed"] for r in runs],
               "params": runs[0]["params"], "non_embedding_params": runs[0]["non_embedding_params"],
               "flops_per_token": runs[0]["flops_per_token"],
               "train_tokens_per_s": _ms([r["train_tokens_per_s"] for r in runs]),
               "by_length": {}}
        for f in LENGTH_FACTORS:
            L = fixed["seq_len"] * f
            rows = [next(x for x in e["rows"] if x["seq_len"] == L) for e in evs]
            row["by_length"][str(L)] = {k: _ms([x[k] for x in rows]) for k in ("loss", "ppl", "bpb")}
        l1 = row["by_length"][str(fixed["seq_len"])]["loss"]["mean"]
        l4 = row["by_length"][str(fixed["seq_len"] * max(LENGTH_FACTORS))]["loss"]["mean"]
        row["loss_4x_over_1x"] = (l4 / l1 - 1) if l1 and l4 else None
        row["by_position"] = {L: _mean_bins([e["by_position"][L] for e in evs]) for L in
                              (evs[0]["by_position"] if evs else {})}
        if evs and "passkey" in evs[0]:
            row["passkey"] = [{**cell, "accuracy": statistics.fmean(e["passkey"][i]["accuracy"] for e in evs)}
                              for i, cell in enumerate(evs[0]["passkey"])]
        arch_rows[arch] = row
    import torch
    return {"fixed": fixed, "archs": a.archs, "seeds": a.seeds,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_count": os.cpu_count(), "threads": a.threads, "platform": platform.platform()},
            "best": arch_rows, "runs": records, "evals": evals}


def _mean_bins(seqs: list) -> list:
    out = []
    for i, b in enumerate(seqs[0]):
        vals = [s[i]["loss"] for s in seqs if s[i]["loss"] is not None]
        out.append({"lo": b["lo"], "hi": b["hi"], "tokens": b["tokens"],
                    "loss": statistics.fmean(vals) if vals else None,
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    return out


# ---- command line ------------------------------------------------------------------------------------------------
def _floats(text, flag, auto):
    if text == "auto":
        return list(auto)
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected 'auto' or comma-separated numbers") from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"{flag} {text!r}: expected positive numbers")
    return vals


def _overrides(items) -> dict:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        arch, dot, field = key.partition(".")
        if not eq or not dot or not field:
            raise ValueError(f"--set {item!r}: expected ARCH.KEY=VALUE, e.g. mega.chunk_size=128")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a bare string
        out.setdefault(arch, {})[field] = value
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="build_shards output with a held-out split")
    p.add_argument("--archs", default="mega,llama", help="comma-separated, from bench/bakeoff_archs.py")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, default=3, help="seeds of the best setting per arch (mean +- std)")
    p.add_argument("--lrs", default="auto", help="LR grid ('auto': the preset's)")
    p.add_argument("--init-ranges", default="auto", help="MEGA initializer_range grid ('auto': the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="training length (default: the preset's)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, for the passkey sweep")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--set", action="append", dest="overrides", metavar="ARCH.KEY=VALUE",
                   help="a config override of one arch (repeatable)")
    p.add_argument("--speed", type=int, default=0, metavar="STEPS",
                   help="instead of the sweep: training tokens/s of the archs interleaved for STEPS steps")
    p.add_argument("--out", required=True, help="results folder (resumable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        a = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    a.command = "python bench/bakeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        preset = PRESETS[a.preset]
        from bench.bakeoff_archs import ARCHS, REFERENCE
        a.archs = [x.strip() for x in a.archs.split(",") if x.strip()]
        unknown = [x for x in a.archs if x not in ARCHS]
        if unknown:
            raise ValueError(f"--archs: unknown {unknown}; known: {', '.join(ARCHS)}")
        if a.seeds < 1 or a.threads < 1:
            raise ValueError("--seeds and --threads: expected positive numbers")
        a.lrs = _floats(a.lrs, "--lrs", preset["lrs"])
        a.init_ranges = _floats(a.init_ranges, "--init-ranges", preset["init_ranges"])
        a.seq_len = a.seq_len or preset["seq_len"]
        a.tokens = a.tokens or preset["tokens"]
        chunk = a.overrides and _overrides(a.overrides).get(REFERENCE, {}).get("chunk_size") or \
            preset["shape"]["chunk_size"]
        if a.seq_len < 1 or a.seq_len % chunk:
            raise ValueError(f"--seq-len {a.seq_len}: must be a positive multiple of MEGA's chunk_size {chunk}")
        if a.tokens < a.seq_len * preset["windows_per_step"]:
            raise ValueError(f"--tokens {a.tokens}: fewer than one step "
                             f"({a.seq_len} x {preset['windows_per_step']} tokens)")
        a.overrides = _overrides(a.overrides)
        if a.tokenizer:
            if not os.path.isfile(os.path.join(a.tokenizer, "tokenizer.model")):
                raise ValueError(f"--tokenizer {a.tokenizer}: no tokenizer.model in it")
            from megatrain.data.tokenizer import load_tokenizer
            from megatrain.eval.passkey import PasskeyFormat
            fmt = PasskeyFormat.from_tokenizer(load_tokenizer(a.tokenizer))
            for f in LENGTH_FACTORS:  # a passkey context too short for the question fails now, not after training
                fmt.prompt(a.seq_len * f, 0.0, "12345")
        manifests(a.data)
        import torch
        torch.set_num_threads(a.threads)
        if a.speed < 0:
            raise ValueError(f"--speed {a.speed}: expected a positive number of steps")
        if a.speed:
            speed_run(a, preset, a.speed)
        else:
            run_sweep(a, preset)
    except ValueError as e:
        print(f"bakeoff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
