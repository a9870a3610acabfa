"""The pretraining job: build everything, then one short, visible loop.

Usage (this is what ``launch/pretrain.py`` calls; any launcher works, see megatrain/parallel/env.py)::

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.yaml train.max_steps=10
    python -m megatrain.train.trainer --config configs/tiny.yaml run_dir=runs/x     # one plain process

Read top-down: the building blocks, ``build_job`` (named steps in order: groups, data, engine, resume, logs;
``Job.state_dict``/``load_state_dict`` is what a checkpoint keeps beside DeepSpeed's state), ``train_step`` (one
optimizer step), ``train`` (the loop, with the fault handling of megatrain/train/faults.py), ``main`` (the entry
point and its one table of exit codes, ``EXIT_CODES``). Per optimizer step (``train_step``), on every rank:
  for each micro-batch: next window (this DP rank's stream) -> ``sp_forward`` (megatrain/parallel/protocol.py:
  this rank's SP slice -> EMA boundary -> forward -> loss sum / the window's label tokens) -> ``engine.backward``
  -> ``engine.step``: DeepSpeed sums gradients over the SP ranks and averages over DP (see
  megatrain/parallel/groups.py), so the update equals the SP=1 update exactly. Before the last backward the step's
  loss is all-reduced on the device; with ``train.spike.action`` skip/rollback, a loss above the spike threshold
  scales that backward by NaN, so the optimizer withholds the update (no host sync: the decision stays on the
  device). The loss (and that decision) is read once per step, after the update (no host sync per micro-batch).
  Then: the spike verdict (warn / skip / rollback to the last checkpoint with the windows since skipped; an
  optional rerun tells hardware from data), per-rank step times and stragglers, metrics, a checkpoint every N
  steps, and a checkpoint + exit on SIGTERM/SIGUSR1. A watchdog thread per rank turns a step (or a collective)
  that outlasts ``train.step_timeout_s`` into stack dumps and exit ``EXIT_REQUEUE``.

Exit codes (``EXIT_CODES``, the one table ``main`` uses): 0 done; 1 a failure while training (a checkpoint save
that failed, non-finite or rolled-back steps past their limits, a shard that cannot be read mid-run, a crash); 2 bad
input, found before the first step (config, data, the checkpoint to resume from); 71 (EX_OSERR) suspect hardware: a
rerun of the same step from the same state differed; 75 (EX_TEMPFAIL) run me again: a stop signal with steps still
to do (the checkpoint is saved), a hang caught by the watchdog, a lost peer rank (resume=auto continues from
``latest``; launch/slurm/pretrain.sbatch requeues on 75 and 71).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import Config, ConfigError, Stage, data_stages, load_config, stage_at
from megatrain.hf.init_from import init_from_hf
from megatrain.data import ShardStream
from megatrain.data.mixture import Source
from megatrain.data.shards import DataError
from megatrain.data.remote import RetryPolicy
from megatrain.eval.in_training import TrainingEval, eval_line
from megatrain.host_alloc import configure_host_allocator, malloc_setting
from megatrain.model import build_model
from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
from megatrain.parallel.env import discover, exit_process, init_process_group
from megatrain.parallel.groups import ParallelGroups
from megatrain.parallel.protocol import sp_forward
from megatrain.parallel.sequence import COMM_STATS, reset_comm_stats
from megatrain.parallel.zero import clip_in_optimizer, deepspeed_config
from megatrain.train.checkpoint import (LAYOUT_KEYS, Checkpointer, CheckpointError, ResumePlan, rng_state,
                                        set_rng_state)
from megatrain.train.faults import (HardwareFault, SpikeAbort, SpikeDetector, Stragglers, Watchdog, host_name,
                                    step_deadline)
from megatrain.train.metrics import MetricsLogger, StepResult, outputs_line, run_flops, step_record
from megatrain.train.optim import build_optimizer, build_scheduler, schedule_changes


EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# sysexits' EX_OSERR: the same step from the same state gave another result: drain the node, run elsewhere
EXIT_HARDWARE = 71
# sysexits' EX_TEMPFAIL ("try again later"): stopped with steps still to do (signal, hang, lost peer)
EXIT_REQUEUE = 75


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ---- building blocks ----
def build_stream(cfg: Config, dp_rank: int, dp_size: int, seq_len: Optional[int] = None):
    """This DP rank's stream: data.shards, or the data.sources mixture; windows of seq_len (default: the first
    stage's). Remote shards retry transient failures data.retries times."""
    d = cfg.data
    where = {"sources": [Source(s["name"], s["shards"], float(s.get("weight", 1.0))) for s in d.sources]} \
        if d.sources else {"urls_or_manifest": d.shards}
    return ShardStream(**where, seq_len=seq_len or data_stages(cfg)[0].seq_len, seed=cfg.train.seed,
                       dp_rank=dp_rank, dp_size=dp_size, num_workers=d.num_workers, objective=cfg.train.objective,
                       vocab_size=cfg.model.vocab_size, mask_token_id=d.mask_token_id, skip_corrupt=d.skip_corrupt,
                       loop=True, retry=RetryPolicy(d.retries, d.retry_backoff_s),
                       **({} if d.lanes is None else {"lanes": d.lanes}))


def follow_tokenizer_ids(cfg: Config, manifest, rank: int) -> None:
    """The model's pad/bos/eos ids become the tokenizer's own, as the shards' manifest records them (a foreign
    sentencepiece model: no pad, eos elsewhere, ...); the export's config and generation follow from there."""
    for key, tid in manifest.model_token_ids().items():
        if getattr(cfg.model, key) != tid:
            if rank == 0:
                print(f"data: model.{key} {getattr(cfg.model, key)} -> {tid} (the tokenizer's, from the shards' "
                      f"manifest)", flush=True)
            setattr(cfg.model, key, tid)


def enter_stage(job: "Job", stage: Stage) -> None:
    """Switch the data and the engine's batch shape to a seq_len stage; the token position carries on."""
    if job.stage == stage:
        return
    was, job.stage = job.stage, stage
    if job.data is not None:
        job.data.close()  # stops the stream's workers (they read ahead at the old length)
    job.stream.set_seq_len(stage.seq_len)
    job.engine.set_train_micro_batch_size(stage.micro_batch_size)
    job.engine.set_train_batch_size(stage.micro_batch_size * stage.grad_accum_steps * job.groups.dp_size)
    job.data = batches(job.stream, stage.micro_batch_size, job.engine.device)
    if dist.get_rank() == 0 and was is not None:
        print(f"data: stage {stage.index + 1}/{len(job.stages)} from step {stage.step}: seq_len {was.seq_len} -> "
              f"{stage.seq_len}, micro_batch_size {stage.micro_batch_size} x grad_accum_steps "
              f"{stage.grad_accum_steps} (tokens per step unchanged; the stream continues at token "
              f"{job.stream.tokens})", flush=True)


def batches(stream, batch_size: int, device) -> Iterator[dict]:
    """Stack ``batch_size`` consecutive windows (the stream is built with loop=True: it cycles epochs)."""
    it = iter(stream)
    try:
        while True:
            samples = [next(it) for _ in range(batch_size)]
            yield {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    finally:
        it.close()  # closing this generator stops the stream's worker processes now, not at garbage collection


class StopFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption / time-limit warning): finish the current step, checkpoint, exit.
    The handlers are process-wide and installed once, as early as main() can (before the slow start-up: the
    default action of SIGUSR1 would kill the process); a signal that came during start-up stops after step 1."""
    _raised = False

    def __init__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(sig) is not StopFlag._handler:
                signal.signal(sig, StopFlag._handler)

    @staticmethod
    def _handler(signum, frame):
        StopFlag._raised = True

    @property
    def raised(self) -> bool:
        return StopFlag._raised

    def agreed(self, device) -> bool:
        # A signal may reach only some ranks: stop together, or the collectives of the next step would hang.
        # On the engine's device: an NCCL group has no CPU collectives.
        t = torch.tensor([1.0 if self.raised else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def resume_line(plan: ResumePlan, layout: dict, cfg: Config, data_note: Optional[str] = None) -> str:
    """One line: where the run resumes from and what differs from the run that wrote the checkpoint."""
    parts = [f"resume: from {plan.tag_dir}"]
    if data_note:  # the stream's own account: new mixture weights, another seq_len
        parts.append(f"data: {data_note}")
    saved_cfg = os.path.join(plan.tag_dir, "config.yaml")
    if os.path.exists(saved_cfg):
        changes = schedule_changes(load_config(saved_cfg).train, cfg.train)
        if changes:
            parts.append(", ".join(changes) + " (schedule recomputed from the config)")
    if plan.layout_changed:
        was = ", ".join(f"{k} {plan.saved[k]} -> {v}" for k, v in layout.items() if plan.saved[k] != v)
        how = "DeepSpeed universal checkpoint" if plan.universal else "unchanged ZeRO shards"
        parts.append(f"layout {was} (model/optimizer via {how}; loader state of rank 0; RNG states not carried "
                     f"over)")
    return "; ".join(parts)


@dataclass
class Counters:
    step: int = 0           # optimizer steps done (including skipped ones)
    tokens: int = 0         # tokens consumed by the whole job
    consecutive_nonfinite: int = 0


# ---- the job ----
@dataclass
class Job:
    """Everything one run holds, built once by build_job."""
    cfg: Config
    groups: ParallelGroups
    engine: object                      # the DeepSpeed engine (model + optimizer + LR schedule)
    stream: object                      # this DP rank's ShardStream
    data: Optional[Iterator[dict]]      # micro-batches of windows from the stream (set by enter_stage)
    ckpt: Checkpointer
    stop: "StopFlag"
    counters: Counters
    layout: dict                        # world/SP/DP sizes, saved with every checkpoint
    tokens_per_step: int                # tokens of one optimizer step, whole job
    stages: list                        # the seq_len schedule (config.data_stages); one stage without one
    stage: Optional[Stage]              # the stage the data and the engine are set up for
    flops_per_token: Optional[float]
    peak_tflops: Optional[float]
    spikes: SpikeDetector
    hosts: list                         # every rank's host name (lines that name a rank)
    evaluator: Optional[TrainingEval] = None  # held-out evaluation (config eval; None = off)
    log: Optional[MetricsLogger] = None  # opened after the resume: it cuts metrics.jsonl back to the resumed step
    replay: Optional[tuple] = None      # train.spike.recheck: the last step's (windows and local losses, RNG)
    watchdog: Optional[Watchdog] = None  # this rank's hang watchdog (train sets it)

    def tick(self) -> None:
        """A mark of progress inside a step (the watchdog names the rank with the fewest as the slowest)."""
        if self.watchdog is not None:
            self.watchdog.tick()

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint beside DeepSpeed's (the Checkpointer adds the RNG states)."""
        return {"loader": self.stream.state_dict(), "counters": vars(self.counters).copy(), "layout": self.layout,
                "spikes": self.spikes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Undo ``state_dict`` (the saved layout is the old run's: kept by the plan, not loaded)."""
        self.stream.load_state_dict(state["loader"])  # ValueError: the checkpoint's stream is not this data
        self.counters = Counters(**state["counters"])
        self.spikes.load_state_dict(state.get("spikes", {}))


def build_job(cfg: Config) -> Job:
    """A validated config (main validates it, once) -> the job, in named steps: the groups, the data (first: a
    config/shard mismatch fails before any heavy work), the model + DeepSpeed engine, the resume, the logs.
    Collective: every rank calls it."""
    groups, layout = make_groups(cfg)
    stream, stages, evaluator = open_data(cfg, groups)
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, dist.get_rank())
    plan = ckpt.plan(cfg.checkpoint.resume, layout)  # which checkpoint, and whether its layout is this run's
    engine, flops_per_token, peak = build_engine(cfg, groups, ckpt, plan)
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host_name())
    job = Job(cfg=cfg, groups=groups, engine=engine, stream=stream, data=None, ckpt=ckpt, stop=StopFlag(),
              counters=Counters(), layout=layout,
              tokens_per_step=cfg.data.seq_len * cfg.data.micro_batch_size * cfg.train.grad_accum_steps
              * groups.dp_size, stages=stages, stage=None, flops_per_token=flops_per_token, peak_tflops=peak,
              spikes=SpikeDetector(cfg.train.spike), hosts=hosts, evaluator=evaluator)
    resume(job, plan)
    open_logs(job)
    enter_stage(job, stage_at(stages, job.counters.step))  # a resume inside a later stage starts there
    return job


def make_groups(cfg: Config) -> tuple:
    """The DP x SP groups and the layout a checkpoint records."""
    world = dist.get_world_size()
    sp = cfg.parallel.sequence_parallel_size
    groups = ParallelGroups(dp_size=world // sp, sp_size=sp)
    return groups, dict(zip(LAYOUT_KEYS, (world, sp, world // sp, cfg.parallel.zero_stage)))


def open_data(cfg: Config, groups: ParallelGroups) -> tuple:
    """(this DP rank's stream, the seq_len stages, the held-out evaluation or None); a mismatch between the config
    and the shards is a ConfigError naming the key."""
    stages = data_stages(cfg)
    try:
        stream = build_stream(cfg, groups.dp_rank, groups.dp_size)
        for st in stages[1:] + stages[:1]:  # every stage has windows for every rank: found now, not at step 2000
            stream.set_seq_len(st.seq_len)
    except ValueError as e:  # DataError included: a mismatch between config and shards
        key = "data.sources" if cfg.data.sources else "data.shards"
        raise ConfigError(f"{key}={cfg.data.sources or cfg.data.shards!r}: {e}") from e
    follow_tokenizer_ids(cfg, stream.manifest, dist.get_rank())
    try:
        evaluator = TrainingEval.build(cfg, groups)  # held-out windows, before any heavy work
    except ValueError as e:  # its messages name eval.shards
        raise ConfigError(str(e)) from e
    return stream, stages, evaluator


def build_engine(cfg: Config, groups: ParallelGroups, ckpt: Checkpointer, plan: Optional[ResumePlan]) -> tuple:
    """The model (+ init_from, activation checkpointing, ZeRO-3 partitioning) and the DeepSpeed engine with our
    optimizer and schedule; (engine, FLOPs per token, peak TFLOP/s or None). A plan of another layout is converted
    to DeepSpeed's universal checkpoint first (a DeepSpeed config setting)."""
    t, rank = cfg.train, dist.get_rank()
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    if plan is not None and plan.universal:
        ckpt.convert(plan)  # ZeRO shards of another world size: DeepSpeed's universal checkpoint
        ds_config["checkpoint"] = {"load_universal": True}
    torch.manual_seed(t.seed)  # identical initial weights everywhere (DeepSpeed also broadcasts them)
    model = build_model(cfg.model)
    if cfg.model.init_from:  # continue pretraining from a transformers MEGA folder (checked in validate)
        init_from_hf(model, cfg.model.init_from)
    # activation checkpointing (+ host offload of the checkpointed layer inputs), applied from outside the model
    apply_checkpointing(model, policy_from_config(cfg.model.gradient_checkpointing, t.offload_activations))
    groups.zero3_partition(model, ds_config)
    optimizer = build_optimizer(model, t, guard=clip_in_optimizer(cfg))
    # imported here, not at the top: importing deepspeed logs an accelerator warning and takes ~2 s, and a run
    # with bad input must have been refused (main) before either happens
    import deepspeed
    # the schedule is built by DeepSpeed on the optimizer it finally steps (ZeRO-3 regroups the parameters)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=lambda opt: build_scheduler(opt, t),
                                           config=ds_config, mpu=groups)
    # dropout differs per rank (different tokens); the stream's own randomness (MLM masking) is seeded by it.
    # Python's and numpy's global generators too: unseeded, they start from OS entropy, and the RNG states a
    # checkpoint holds would differ between two identical runs (nothing of ours draws from them today).
    torch.manual_seed(t.seed + 1 + rank)
    random.seed(t.seed + 1 + rank)
    np.random.seed(t.seed + 1 + rank)
    return (engine, *run_flops(cfg, model))


def load_checkpoint(job: Job, plan: ResumePlan, rollback: bool = False) -> dict:
    """DeepSpeed's state into the engine, ours into the job (stream at the resumed step's length, counters, spike
    history, RNG), the LR from (position, config); returns our state. ``rollback``: the stream stays where it is
    (nothing it handed out since the checkpoint is handed out again) and the job keeps its list of rollbacks."""
    state = job.ckpt.load(job.engine, plan)
    try:
        if rollback:
            job.counters = Counters(**state["counters"])
            job.spikes.load_state_dict(state.get("spikes", {}), rollbacks=False)
        else:
            # the length the resumed step reads (the loader state counts tokens; its windows are cut at this length)
            job.stream.set_seq_len(stage_at(job.stages, state["counters"]["step"]).seq_len)
            job.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {plan.tag_dir}: {e}") from e
    # the LR is a function of (position, config): the optimizer's load restored the old run's rates
    job.engine.lr_scheduler.sync()
    return state


def resume(job: Job, plan: Optional[ResumePlan]) -> None:
    if plan is None:
        return
    load_checkpoint(job, plan)
    if dist.get_rank() == 0:
        print(resume_line(plan, job.layout, job.cfg, job.stream.resume_note), flush=True)


def open_logs(job: Job) -> None:
    """The resolved config beside the run, and the metrics logger (cut back to the resumed step)."""
    cfg, rank = job.cfg, dist.get_rank()
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
    wb = cfg.logging.wandb
    job.log = MetricsLogger(cfg.run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                            resume_step=job.counters.step, print_every=cfg.logging.every_steps,
                            total_steps=cfg.train.max_steps,
                            wandb={"project": wb.project, "mode": wb.mode, "name": wb.name, "config": cfg.to_dict()}
                            if wb.project else None)


# ---- one optimizer step ----
def train_step(job: Job) -> StepResult:
    """One optimizer step: grad_accum_steps micro-batches, each through the SP protocol (slice, EMA boundary,
    forward, SP loss reduction: parallel/protocol.py) and backward; the engine steps at the accumulation boundary.
    The step's loss is all-reduced before the last backward, on the device: a loss spike (``train.spike``
    skip/rollback) withholds the update from there (see megatrain/train/faults.py)."""
    cfg, engine, groups = job.cfg, job.engine, job.groups
    accum, dp = job.stage.grad_accum_steps, groups.dp_size
    causal = cfg.train.objective == "clm"
    t0 = time.time()
    reset_comm_stats()
    lr = engine.get_lr()[0]  # the rate this step's update uses (the schedule advances inside step())
    threshold = job.spikes.loss_threshold() if job.spikes.withholds else None
    recheck = cfg.train.spike.recheck
    replay = ([], rng_state()) if recheck else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # read once, after the update
    withheld = torch.zeros((), dtype=torch.bool, device=engine.device)
    busy = 0.0
    for i in range(accum):
        window = next(job.data)
        # W = 1: DeepSpeed sums the SP ranks' gradients (its divisor is DP, not DP x SP)
        loss = sp_forward(engine, window, groups.sp_group, causal=causal,
                          reset_at_doc_boundaries=cfg.data.reset_at_doc_boundaries, grad_average_size=1)
        job.tick()
        loss_sum += loss.mean_loss.detach().double()
        backward_loss = loss.backward_loss
        if replay is not None:
            replay[0].append((window, backward_loss.detach().clone()))
        if i == accum - 1:
            busy = time.time() - t0  # this rank's time to the step's first wait for every DP rank
            # the logged loss is the mean over micro-batches and DP replicas (identical on SP ranks)
            dist.all_reduce(loss_sum, group=groups.dp_group)
            if threshold is not None:  # on the device: NaN gradients make every optimizer skip the update
                withheld = loss_sum / (accum * dp) > threshold
                backward_loss = backward_loss * torch.where(withheld, float("nan"), 1.0).to(backward_loss.dtype)
        engine.backward(backward_loss)
        job.tick()
        engine.step()  # an optimizer step only at the accumulation boundary
        job.tick()
    loss_total, withheld_flag = torch.stack([loss_sum, withheld.double()]).tolist()  # the step's one host read
    step_loss = loss_total / (accum * dp)
    gn = engine.get_global_grad_norm()
    job.replay = replay
    return StepResult(loss=step_loss, lr=lr, grad_norm=float(gn) if gn is not None else None,
                      applied=engine.was_step_applied() and math.isfinite(step_loss),
                      skipped_steps=int(engine.skipped_steps), seconds=max(time.time() - t0, 1e-9),
                      sp_comm_bytes=COMM_STATS.total_bytes if groups.sp_size > 1 else None,
                      withheld=bool(withheld_flag), busy_seconds=busy)


def rank_seconds(job: Job, busy: float) -> list:
    """Every rank's busy time of the step (one small all-gather, on the engine's device)."""
    mine = torch.tensor([busy], dtype=torch.float64, device=job.engine.device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [float(x) for x in torch.cat(out).tolist()]


def data_record(job: Job) -> dict:
    """The data part of a step's metrics: the stage (with a schedule), per-source tokens and epochs."""
    rec = {f"data/{name}/{k}": v for name, st in job.stream.source_stats().items() for k, v in st.items()} \
        if job.cfg.data.sources else {}  # per-source figures for a mixture only
    if len(job.stages) > 1:
        rec.update(stage=job.stage.index + 1, stages=len(job.stages), seq_len=job.stage.seq_len)
    return rec


# ---- faults judged in the loop (megatrain/train/faults.py) ----
def rerun_differs(job: Job) -> list:
    """Collective: rerun the last step's forwards from the same state (weights: the update was withheld; RNG; the
    same windows) and compare this rank's own losses bitwise. [(rank, host)] of the ranks that differ."""
    kept, rng0 = job.replay
    after = rng_state()
    set_rng_state(rng0)
    cfg, groups = job.cfg, job.groups
    mine = False
    for window, local in kept:
        loss = sp_forward(job.engine, window, groups.sp_group, causal=cfg.train.objective == "clm",
                          reset_at_doc_boundaries=cfg.data.reset_at_doc_boundaries, grad_average_size=1)
        again = loss.backward_loss.detach()
        same = (again == local) | (again.isnan() & local.isnan())
        mine = mine or not bool(same.all())
    set_rng_state(after)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, mine)
    return [(r, job.hosts[r]) for r, f in enumerate(flags) if f]


def rollback(job: Job, spike) -> Optional[dict]:
    """Return to the newest complete checkpoint and pass over the windows from there to the spike's step (plus
    train.spike.skip_steps_past steps), recorded in the stream's skipped_windows. None when there is no checkpoint
    of this layout to return to (the caller skips the step instead). SpikeAbort past the rollback limit."""
    sc = job.cfg.train.spike
    job.spikes.rollbacks.append({"spike_step": spike.step})
    n = job.spikes.count_rollbacks(spike.step)
    if n > sc.max_rollbacks:
        raise SpikeAbort(f"spike: {spike.describe()}: {n} rollbacks within train.spike.rollback_window="
                         f"{sc.rollback_window} steps, more than train.spike.max_rollbacks={sc.max_rollbacks}; "
                         f"stopping (the data or the settings need a look: metrics.jsonl lists every rollback)")
    plan = job.ckpt.plan("auto", job.layout)
    if plan is None or plan.layout_changed or plan.universal:
        job.spikes.rollbacks.pop()
        return None
    job.data.close()
    job.data, job.stage = None, None
    saved = load_checkpoint(job, plan, rollback=True)["loader"]
    c = job.counters  # the checkpoint's
    job.spikes.rollbacks[-1]["to_step"] = c.step
    # Everything the stream handed out since the checkpoint (the spike's windows included; a second rollback to the
    # same checkpoint: the first one's skip too) is passed over, and so are the next skip_steps_past steps' windows.
    for s in range(spike.step, spike.step + sc.skip_steps_past):  # 0-based steps after the spike
        st = stage_at(job.stages, s)
        job.stream.set_seq_len(st.seq_len)
        job.stream.skip(st.micro_batch_size * st.grad_accum_steps * job.groups.dp_size)
    skipped = job.stream.mark_skipped(saved["position"], job.stream.position, saved["tokens"], job.stream.tokens,
                                      reason="rollback", spike_step=spike.step, from_step=c.step)
    enter_stage(job, stage_at(job.stages, c.step))
    return {"step": c.step, "event": "rollback", "spike": spike.record(), "checkpoint": plan.tag,
            "skipped_windows": skipped["positions"], "skipped_tokens": skipped["tokens"], "rollbacks": n}


def judge_step(job: Job, res: StepResult, first_pos: tuple, rec: dict) -> Optional[dict]:
    """The spike verdict on the step just done (counters already advanced): warn, skip or roll back; with
    train.spike.recheck a rerun first tells hardware (HardwareFault) from data. Adds to the step's record ``rec``;
    returns the rollback record when the run went back to a checkpoint."""
    sc, c, rank0 = job.cfg.train.spike, job.counters, dist.get_rank() == 0
    spike = job.spikes.judge(c.step, res.loss, res.grad_norm, res.withheld)
    nonfinite = not res.applied and not res.withheld
    if sc.recheck and ((spike is not None and spike.withheld) or nonfinite):
        bad = rerun_differs(job)
        what = spike.describe() if spike is not None else f"step {c.step} non-finite (loss {res.loss})"
        if bad:
            raise HardwareFault(f"{what}; a rerun from the same state gave other losses on " + ", ".join(
                f"rank {r} (host {h})" for r, h in bad) + ": suspect hardware (silent data corruption); drain "
                f"{'that node' if len({h for _, h in bad}) == 1 else 'those nodes'} and run elsewhere")
        if rank0:
            print(f"megatrain: recheck: {what}: the rerun gave the same losses on every rank: the data", flush=True)
        rec["recheck"] = "same"
    if spike is None:
        return None
    rec["spike"] = spike.record()
    action = sc.action
    if action == "rollback":
        back = rollback(job, spike)
        if back is not None:
            if rank0:
                w, tk = back["skipped_windows"], back["skipped_tokens"]
                print(f"megatrain: spike: {spike.describe()}: rolled back to step {back['step']} "
                      f"({os.path.join(job.ckpt.dir, back['checkpoint'])}); windows [{w[0]}, {w[1]}) (tokens [{tk[0]}, {tk[1]})) skipped; rollback {back['rollbacks']} "
                      f"of at most {sc.max_rollbacks} in {sc.rollback_window} steps", flush=True)
            return back
        action = "skip"  # no checkpoint of this layout yet: withhold the step instead
        note = "no checkpoint to roll back to: skipped"
    else:
        note = action
    if action == "skip" and spike.withheld:
        skipped = job.stream.mark_skipped(first_pos[0], job.stream.position, first_pos[1], job.stream.tokens,
                                          reason="skip", step=c.step)
        rec["skipped_windows"] = skipped["positions"]
        note += f"; update withheld, windows [{skipped['positions'][0]}, {skipped['positions'][1]}) skipped"
    elif action == "skip":
        note += " (a gradient-norm spike is known after the update: applied, clipped to train.grad_clip)"
    if rank0:
        print(f"megatrain: spike: {spike.describe()}: {note}", flush=True)
    return None


# ---- the loop ----
def train(cfg: Config, on_start: Optional[Callable[[], None]] = None) -> Counters:
    """Run the configured job on an initialised process group. Returns the final counters. ``on_start`` is called
    once the job is built, before the first step (main's exit codes tell bad input from a failure while training)."""
    job = build_job(cfg)
    if on_start is not None:
        on_start()
    c, t = job.counters, cfg.train
    rank, world = dist.get_rank(), dist.get_world_size()
    watchdog = job.watchdog = start_watchdog(job)
    stragglers = Stragglers(t.straggler_factor, t.straggler_steps)
    times: list = []  # recent step times (the default step deadline)
    try:
        while c.step < t.max_steps:
            enter_stage(job, stage_at(job.stages, c.step))
            deadline = step_deadline(t.step_timeout_s, t.step_timeout_floor_s, times, first=not times)
            watchdog.arm(c.step + 1, "step", deadline)
            first_pos = (job.stream.position, job.stream.tokens)
            res = train_step(job)
            c.step += 1
            c.tokens += job.tokens_per_step
            times = (times + [res.seconds])[-100:]
            c.consecutive_nonfinite = 0 if res.applied or res.withheld else c.consecutive_nonfinite + 1
            rec = {**step_record(c.step, c.tokens, res, job.tokens_per_step, world, job.flops_per_token,
                                 job.peak_tflops), **data_record(job)}
            if world > 1:
                rec["rank_seconds"] = rank_seconds(job, res.busy_seconds)
                lag = stragglers.observe(c.step, rec["rank_seconds"], job.hosts)
                if lag and rank == 0:
                    print(lag, flush=True)
            watchdog.arm(c.step, "spike verdict", 10 * deadline)  # a rerun or a rollback takes a while
            back = judge_step(job, res, first_pos, rec)
            if back is not None:  # the step's record belongs to the abandoned trajectory
                c = job.counters
                job.log.rewind(back["step"])
                job.log.log_event(back)
                continue
            job.log.log(rec)
            if c.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                raise NonFiniteAbort(f"aborting at step {c.step}: {c.consecutive_nonfinite} consecutive steps with "
                                     f"non-finite loss/gradient (loss={res.loss}, grad_norm={res.grad_norm}); "
                                     f"limit is train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}")
            if job.evaluator is not None and job.evaluator.due(c.step, last=c.step == t.max_steps):
                watchdog.arm(c.step, "eval", 10 * deadline)
                rec = job.evaluator.run(job.engine, c.step)  # forward only; leaves training untouched
                job.log.log_other(rec, "eval", eval_line(rec))
            watchdog.arm(c.step, "stop/checkpoint", 10 * deadline)
            stopping = job.stop.agreed(job.engine.device)
            if c.step % cfg.checkpoint.every_steps == 0 or c.step == t.max_steps or stopping:
                job.ckpt.save(job.engine, c.step, job.state_dict(), cfg)
            watchdog.disarm()
            if stopping:
                if rank == 0:
                    todo = t.max_steps - c.step
                    print(f"megatrain: stop signal: checkpoint at step {c.step} saved; " +
                          (f"{todo} steps to do: exiting {EXIT_REQUEUE} to be run again (resume=auto continues)"
                           if todo > 0 else "the run is complete"), flush=True)
                break
    finally:
        watchdog.close()
        job.log.close()
        if job.data is not None:
            job.data.close()
    if rank == 0:
        print(outputs_line(cfg, c.step), flush=True)
    return c


def start_watchdog(job: Job) -> Watchdog:
    """This rank's watchdog; the process group's store carries the hang reports (not the group: it may hang)."""
    store, nonce = None, [None]
    if dist.get_world_size() > 1:
        try:
            store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError):  # no store (a custom init): each rank reports only itself
            store = None
        if dist.get_rank() == 0:
            nonce[0] = f"{os.getpid()}-{time.time_ns()}"
        dist.broadcast_object_list(nonce, src=0)
    return Watchdog(job.cfg.run_dir, dist.get_rank(), dist.get_world_size(), store, nonce[0] or "")


# ---- entry point ----
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MEGA pretraining (see configs/ and megatrain/config.py)")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used instead")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 parallel.zero_stage=2")
    return p.parse_args(argv)


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "Timed out", "timed out")


def lost_peer(e: BaseException) -> bool:
    """A collective that failed because another rank is gone or stuck (gloo raises a plain RuntimeError)."""
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(m in str(e) for m in LOST_PEER)


# exception -> (exit code before the first step, exit code while training, printed by every rank). Every rank finds
# the same bad input and the same all-reduced verdicts: rank 0 prints; what one rank meets alone, it prints itself.
EXIT_CODES = [
    (ConfigError, EXIT_BAD_INPUT, EXIT_FAILED, False),  # CheckpointError: the resume checkpoint (2), a save (1)
    (NonFiniteAbort, EXIT_FAILED, EXIT_FAILED, False),
    (SpikeAbort, EXIT_FAILED, EXIT_FAILED, False),
    (HardwareFault, EXIT_HARDWARE, EXIT_HARDWARE, False),  # the line names the ranks and hosts
    (DataError, EXIT_BAD_INPUT, EXIT_FAILED, True),     # a shard read fails on the rank(s) reading it
]


def exit_code(e: BaseException, started: bool) -> Optional[tuple]:
    """(code, every rank prints) for an exception of the table (a lost peer: EXIT_REQUEUE), None otherwise."""
    if not isinstance(e, (ConfigError, DataError)) and lost_peer(e):
        return EXIT_REQUEUE, True
    for kind, before, during, every_rank in EXIT_CODES:
        if isinstance(e, kind):
            return (during if started else before), every_rank
    return None


def main(argv=None) -> int:
    """Exit codes: see the module docstring and EXIT_CODES.

    Every rank finds the same bad input, so only rank 0 prints its one line; the rank comes from the launcher's
    environment (discover), known before any process group exists, and the other ranks exit 2 silently."""
    configure_host_allocator()  # first (launch/pretrain.py did it before importing torch): megatrain/host_alloc.py
    try:
        env = discover()
    except ValueError as e:  # a broken launcher environment: no rank to go by, each process says it
        print(f"pretrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def say(e: Exception, every_rank: bool = False) -> None:
        if env.rank == 0 or every_rank:
            where = f"rank {env.rank}: " if every_rank and env.world_size > 1 else ""
            print(f"pretrain: error: {where}{e}", file=sys.stderr, flush=True)
        else:  # launchers kill the other ranks when one fails: let rank 0 print its line first
            time.sleep(3)

    with contextlib.redirect_stderr(io.StringIO()) if env.rank else contextlib.nullcontext():
        args = parse_args(argv)  # argparse's usage error (exit 2) from rank 0 only
    try:
        malloc_setting()  # a bad MEGATRAIN_MALLOC (preload_fast_malloc left it to this line)
        cfg = load_config(args.config, args.overrides)
        # bad input fails here, before any work; the one validation of the run
        cfg.validate(world_size=env.world_size, check_files=True, accelerator=torch.cuda.is_available())
    except (ConfigError, ValueError) as e:  # bad input: one clear line, no traceback
        say(e)
        return EXIT_BAD_INPUT
    StopFlag()  # before the slow start-up: a preemption signal then stops cleanly instead of killing the process
    backend = init_process_group(env, cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    if env.rank == 0:
        print(f"megatrain: launcher={env.launcher} world={env.world_size} backend={backend} "
              f"sp={cfg.parallel.sequence_parallel_size} zero={cfg.parallel.zero_stage} run_dir={cfg.run_dir}",
              flush=True)
    started = [False]
    try:
        counters = train(cfg, on_start=lambda: started.__setitem__(0, True))
    except Exception as e:
        known = exit_code(e, started[0])
        if known is None:
            raise  # a crash: its traceback, exit 1
        code, every_rank = known
        say(e if code != EXIT_REQUEUE else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; a peer rank "
            f"is gone or stuck: exiting {EXIT_REQUEUE} to be run again (resume=auto continues)", every_rank)
        return code
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    return EXIT_REQUEUE if counters.step < cfg.train.max_steps else 0


if __name__ == "__main__":
    exit_process(main())  # see megatrain.parallel.env.exit_process
