"""Per-step metrics: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard events, a console line.

Usage (rank 0 writes; other ranks pass ``enabled=False`` and every call is a no-op)::

    log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=True, resume_step=start_step, total_steps=100)
    log.log(step_record(step, tokens, result, ...))     # the record of one optimizer step (see step_record)
    log.close()
    print(outputs_line(cfg, step))                      # where the run's outputs are

The console gets one plain line every ``print_every`` steps (readable in a log file too: no carriage returns, no
bar), e.g. ``step 40/100 (40%) | loss 3.2104 | lr 0.0003 | gnorm 0.412 | tok/s 5321 | skipped 0 | 00:31<00:46``:
elapsed since this process started training < ETA (tqdm's format: remaining steps x the mean wall time per step
since the first step of this process, checkpoint saves included).

On resume, ``metrics.jsonl`` is cut back to the steps the checkpoint covers, so the file always holds one
trajectory: lines written by a killed run after its last checkpoint are dropped, then re-made by the resumed run.
A loss-spike rollback cuts it back the same way (``rewind``) and writes one ``"event": "rollback"`` line (the spike,
the checkpoint, the skipped windows) at the step it returned to. Besides the step's figures a line may carry
``rank_seconds`` (every rank's busy time, runs of more than one rank), ``spike`` (train.spike's verdict),
``withheld`` + ``skipped_windows`` (a skipped spike) and ``nonfinite``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from megatrain.io import atomic_file

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_metrics(path: str, last_step: int, resume: bool = True) -> None:
    """Keep only lines with ``step <= last_step`` (and drop a torn last line from a crash). A rollback line at step
    s (``"event": "rollback"``) was written after the checkpoint of step s: a ``resume`` there drops it too (the
    resumed run makes it again); a rollback to s keeps the earlier ones."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn write can only be the last line
            step = rec.get("step", 0)
            if step < last_step or step == last_step and not (resume and rec.get("event") == "rollback"):
                keep.append(json.dumps(rec) + "\n")
    with atomic_file(path) as f:
        f.writelines(keep)


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def model_flops_per_token(num_params: int, num_layers: int, attn_span: int, qk_dim: int, v_dim: int,
                          causal: bool) -> float:
    """Training FLOPs per token (the MFU numerator): 6 x params (every weight's matmul: 2 forward, 4 backward)
    plus the chunked attention's two matmuls per layer, QK^T (2 x span x qk) and AV (2 x span x v) forward, so
    6 x span x (qk + v) forward + backward, halved when causal (PaLM's convention: the masked half a kernel may
    compute is not useful work). The blocked EMA's own matmuls are not model FLOPs (a scan computes the same
    with none): tests/train/test_metrics.py measures them beside these terms with FlopCounterMode."""
    attn = 6.0 * num_layers * attn_span * (qk_dim + v_dim) * (0.5 if causal else 1.0)
    return 6.0 * num_params + attn


@dataclass
class StepResult:
    """What one optimizer step (megatrain.train.trainer.train_step) reports."""
    loss: float                  # mean token loss over micro-batches and DP replicas
    lr: float                    # the rate this step's update used
    grad_norm: Optional[float]
    applied: bool                # False: non-finite loss/gradient, the update was skipped
    skipped_steps: int           # the engine's running count
    seconds: float
    sp_comm_bytes: Optional[int] = None  # EMA boundary bytes this rank sent (sequence parallelism only)
    withheld: bool = False       # a loss spike: the update was withheld on purpose (train.spike)
    busy_seconds: float = 0.0    # this rank's time to the step's loss reduction (per-rank times, stragglers)


def _finite_or_none(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def step_record(step: int, tokens: int, res: StepResult, tokens_per_step: int, world_size: int,
                flops_per_token: Optional[float], peak_tflops: Optional[float]) -> dict:
    """The metrics.jsonl line of one step. Non-finite values are logged as null (strict JSON), the step marked."""
    rec = {"step": step, "loss": _finite_or_none(res.loss), "lr": res.lr, "grad_norm": _finite_or_none(res.grad_norm),
           "tokens": tokens, "tokens_per_s": tokens_per_step / res.seconds, "skipped_steps": res.skipped_steps}
    if res.withheld:
        rec["withheld"] = True
    elif not res.applied:
        rec["nonfinite"] = True
    if res.sp_comm_bytes is not None:  # independent of seq_len
        rec["sp_comm_bytes"] = res.sp_comm_bytes
    if flops_per_token:
        rec["tflops"] = flops_per_token * tokens_per_step / res.seconds / world_size / 1e12
        if peak_tflops:
            rec["mfu"] = rec["tflops"] / peak_tflops
    if torch.cuda.is_available():
        rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return rec


def eta_seconds(step: int, total: int, first_step: int, t_first: float, now: float, t_start: float) -> float:
    """Seconds to ``total``: remaining steps x the mean wall time per step after ``first_step`` (the first step this
    process logged, at ``t_first``, after starting at ``t_start``; a first step is slow, so it is used alone only
    until a second one exists)."""
    per_step = (now - t_first) / (step - first_step) if step > first_step else t_first - t_start
    return max(0, total - step) * per_step


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int = 0,
                 print_every: int = 1, stream=None, total_steps: Optional[int] = None, wandb: Optional[dict] = None):
        self.enabled, self.print_every, self.total = enabled, print_every, total_steps
        self.stream = stream or sys.stdout
        self._first = None  # (step, time) of the first step this process logged: the ETA's clock
        self._tb = None
        self._file = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = self._path = os.path.join(run_dir, METRICS_FILE)
        truncate_metrics(path, resume_step) if resume_step > 0 else open(path, "w").close()
        self._file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=resume_step + 1)
        if wandb:
            self._wandb = _wandb_run(run_dir, **wandb)
        self._t0 = time.time()

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()  # the file is the record a killed run leaves behind
        step = rec["step"]
        self._scalars(rec, "train", lambda k: k)
        now = time.time()
        if self._first is None:
            self._first = (step, now)
        if step % self.print_every == 0 or step == self.total:
            print(self._line(rec, now), file=self.stream, flush=True)

    def log_other(self, rec: dict, tb_prefix: str, line: str) -> None:
        """Another record of a step (e.g. held-out evaluation, megatrain/eval): its metrics.jsonl line, its numbers
        as TensorBoard ``tb_prefix/<key without "eval_">`` scalars, and its console line, printed always."""
        if not self.enabled:
            return
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self._scalars(rec, tb_prefix, lambda k: k.split("_", 1)[-1])
        print(line, file=self.stream, flush=True)

    def log_event(self, rec: dict) -> None:
        """A record that is not a step's (e.g. a rollback, ``"event"`` names it): metrics.jsonl only (the trainer
        prints its own line)."""
        if self.enabled:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def rewind(self, step: int) -> None:
        """Cut metrics.jsonl (and TensorBoard) back to ``step``: the run went back to that step's checkpoint."""
        if not self.enabled:
            return
        self._file.close()
        truncate_metrics(self._path, step, resume=False)
        self._file = open(self._path, "a")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb.close()
            self._tb = SummaryWriter(self._tb.log_dir, purge_step=step + 1)

    def _scalars(self, rec: dict, prefix: str, name) -> None:
        """The record's numbers as TensorBoard (and W&B) scalars ``prefix/name(key)`` at its step."""
        vals = {k if "/" in k else f"{prefix}/{name(k)}": v for k, v in rec.items()  # data/<source>/tokens as is
                if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, rec["step"])
        if self._wandb is not None:
            self._wandb.log(vals, step=rec["step"])

    def _line(self, rec: dict, now: float) -> str:
        step, loss, gn = rec["step"], rec.get("loss"), rec.get("grad_norm")
        head = f"step {step}"
        if self.total:
            head += f"/{self.total} ({100 * step / self.total:.0f}%)"
        parts = [head, f"loss {loss:.4f}" if loss is not None else "loss nan", f"lr {rec['lr']:.3g}",
                 f"gnorm {gn:.3f}" if gn is not None else "gnorm nan",
                 f"tok/s {rec['tokens_per_s']:.0f}", f"skipped {rec['skipped_steps']}"]
        if rec.get("mfu") is not None:
            parts.append(f"mfu {100 * rec['mfu']:.1f}%")
        if rec.get("stage") is not None:  # a seq_len schedule: which stage, at which length
            parts.append(f"stage {rec['stage']}/{rec['stages']} (seq_len {rec['seq_len']})")
        if self.total:
            eta = eta_seconds(step, self.total, *self._first, now, self._t0)
            parts.append(f"{tqdm.format_interval(now - self._t0)}<{tqdm.format_interval(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_run(run_dir: str, project: str, mode: str, name: Optional[str] = None, config: Optional[dict] = None):
    """A W&B run writing under run_dir/wandb; the run id is kept in run_dir/wandb_id so that a resumed job
    continues the same run (online; offline, each process writes its own offline-run folder for `wandb sync`)."""
    import wandb
    id_file = os.path.join(run_dir, "wandb_id")
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file + ".tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(id_file + ".tmp", id_file)
    return wandb.init(project=project, mode=mode, dir=run_dir, id=run_id, resume="allow",
                      name=name or os.path.basename(os.path.normpath(run_dir)), config=config)


def outputs_line(cfg, step: int) -> str:
    """The closing console line: how far the run got and where its outputs are. Reads run_dir, checkpoint.dir,
    train.max_steps and logging.tensorboard of the whole Config."""
    from megatrain.train.checkpoint import read_latest
    total = cfg.train.max_steps
    latest = read_latest(cfg.checkpoint_dir) if os.path.isdir(cfg.checkpoint_dir) else None
    parts = [f"megatrain: {'done' if step >= total else 'stopped'} at step {step}/{total}",
             f"run_dir {cfg.run_dir}", f"metrics {os.path.join(cfg.run_dir, METRICS_FILE)}",
             f"checkpoint {os.path.join(cfg.checkpoint_dir, latest) if latest else 'none'}"]
    if cfg.logging.tensorboard:
        parts.append(f"tensorboard {os.path.join(cfg.run_dir, TENSORBOARD_DIR)}")
    return " | ".join(parts)


def run_flops(cfg, model) -> tuple:
    """(training FLOPs per token, peak TFLOP/s per device or None) of a run config and its built model. Reads
    model.*, data.seq_len, train.objective and logging.peak_tflops of the whole Config."""
    m = cfg.model
    span = m.chunk_size if m.use_chunking else cfg.data.seq_len
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: full size, not the shard
    fpt = model_flops_per_token(n, m.num_hidden_layers, span, m.shared_representation_size,
                                m.intermediate_size, causal=cfg.train.objective == "clm")
    peak = cfg.logging.peak_tflops
    if peak is None and torch.cuda.is_available():
        peak = peak_tflops_guess(torch.cuda.get_device_name())
    return fpt, peak


def peak_tflops_guess(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak per device for MFU, for common GPUs (None = unknown: no MFU)."""
    if not device_name:
        return None
    table = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}
    for key, val in table.items():
        if key in device_name:
            return val
    return None
