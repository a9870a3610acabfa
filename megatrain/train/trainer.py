"""The pretraining job: build everything, then one short, visible loop.

Usage (this is what ``launch/pretrain.py`` calls; any launcher works, see megatrain/parallel/env.py)::

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.yaml train.max_steps=10
    python -m megatrain.train.trainer --config configs/tiny.yaml run_dir=runs/x     # one plain process

Read top-down: the building blocks, ``build_job`` (everything a run holds; ``Job.state_dict``/``load_state_dict``
is what a checkpoint keeps beside DeepSpeed's state), ``train_step`` (one optimizer step), ``train`` (the loop),
``main`` (the entry point). Per optimizer step (``train_step``), on every rank:
  for each micro-batch: next window (this DP rank's stream) -> ``sp_forward_backward`` (megatrain/parallel/
  protocol.py: this rank's SP slice -> EMA boundary -> forward -> loss sum / the window's label tokens ->
  ``engine.backward``) -> ``engine.step``: DeepSpeed sums gradients over the SP ranks and averages over DP (see
  megatrain/parallel/groups.py), so the update equals the SP=1 update exactly. The logged loss stays on the
  device until the step's one all-reduce (no host sync per micro-batch).
  Then metrics, checkpoint every N steps, and a checkpoint + exit on SIGTERM/SIGUSR1: exit 0 when the run is done,
  ``EXIT_REQUEUE`` (75) when steps are still to do, so a launcher can run it again (launch/slurm/pretrain.sbatch
  requeues the job on 75; checkpoint.resume=auto continues from ``latest``).
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
from typing import Iterator, Optional

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
from megatrain.parallel.protocol import sp_forward_backward
from megatrain.parallel.sequence import COMM_STATS, reset_comm_stats
from megatrain.parallel.zero import clip_in_optimizer, deepspeed_config
from megatrain.train.checkpoint import LAYOUT_KEYS, Checkpointer, CheckpointError, ResumePlan
from megatrain.train.metrics import MetricsLogger, StepResult, outputs_line, run_flops, step_record
from megatrain.train.optim import build_optimizer, build_scheduler, schedule_changes


# sysexits' EX_TEMPFAIL ("try again later"): a stop signal arrived with steps still to do; the checkpoint is saved.
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
    evaluator: Optional[TrainingEval] = None  # held-out evaluation (config eval; None = off)
    log: Optional[MetricsLogger] = None  # opened after the resume: it cuts metrics.jsonl back to the resumed step

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint beside DeepSpeed's (the Checkpointer adds the RNG states)."""
        return {"loader": self.stream.state_dict(), "counters": vars(self.counters).copy(), "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        """Undo ``state_dict`` (the saved layout is the old run's: kept by the plan, not loaded)."""
        self.stream.load_state_dict(state["loader"])  # ValueError: the checkpoint's stream is not this data
        self.counters = Counters(**state["counters"])


def build_job(cfg: Config) -> Job:
    """Validate, make the groups, open the data (first: a config/shard mismatch fails before any heavy work), build
    model + DeepSpeed engine, resume if a checkpoint says so, open the logs. Collective: every rank calls it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate(world_size=world)
    sp = cfg.parallel.sequence_parallel_size
    dp = world // sp
    groups = ParallelGroups(dp_size=dp, sp_size=sp)
    t = cfg.train
    stages = data_stages(cfg)
    try:
        stream = build_stream(cfg, groups.dp_rank, dp)
        for st in stages[1:] + stages[:1]:  # every stage has windows for every rank: found now, not at step 2000
            stream.set_seq_len(st.seq_len)
    except ValueError as e:  # DataError included: a mismatch between config and shards
        key = "data.sources" if cfg.data.sources else "data.shards"
        raise ConfigError(f"{key}={cfg.data.sources or cfg.data.shards!r}: {e}") from e
    follow_tokenizer_ids(cfg, stream.manifest, rank)
    try:
        evaluator = TrainingEval.build(cfg, groups)  # held-out windows, before any heavy work
    except ValueError as e:  # its messages name eval.shards
        raise ConfigError(str(e)) from e

    ds_config = deepspeed_config(cfg, world)
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, rank)
    layout = dict(zip(LAYOUT_KEYS, (world, sp, dp, cfg.parallel.zero_stage)))
    plan = ckpt.plan(cfg.checkpoint.resume, layout)  # which checkpoint, and whether its layout is this run's
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

    flops_per_token, peak = run_flops(cfg, model)
    job = Job(cfg=cfg, groups=groups, engine=engine, stream=stream, data=None, ckpt=ckpt, stop=StopFlag(),
              counters=Counters(), layout=layout,
              tokens_per_step=cfg.data.seq_len * cfg.data.micro_batch_size * t.grad_accum_steps * dp,
              stages=stages, stage=None, flops_per_token=flops_per_token, peak_tflops=peak, evaluator=evaluator)
    state = ckpt.load(engine, plan)  # DeepSpeed's state into the engine; ours comes back for the job
    if state is not None:
        # the length the resumed step reads (the loader state counts tokens; its windows are cut at this length)
        stream.set_seq_len(stage_at(stages, state["counters"]["step"]).seq_len)
        try:
            job.load_state_dict(state)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {plan.tag_dir}: {e}") from e
        # the LR is a function of (position, config): the optimizer's load restored the old run's rates
        engine.lr_scheduler.sync()
        if rank == 0:
            print(resume_line(plan, layout, cfg, stream.resume_note), flush=True)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
    wb = cfg.logging.wandb
    job.log = MetricsLogger(cfg.run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                            resume_step=job.counters.step, print_every=cfg.logging.every_steps,
                            total_steps=t.max_steps,
                            wandb={"project": wb.project, "mode": wb.mode, "name": wb.name, "config": cfg.to_dict()}
                            if wb.project else None)
    enter_stage(job, stage_at(stages, job.counters.step))  # a resume inside a later stage starts there
    return job


def train_step(job: Job) -> StepResult:
    """One optimizer step: grad_accum_steps micro-batches, each through the SP protocol (slice, EMA boundary,
    forward, SP loss reduction, backward: parallel/protocol.py); the engine steps at the accumulation boundary."""
    cfg, engine, groups = job.cfg, job.engine, job.groups
    sp, accum = cfg.parallel.sequence_parallel_size, job.stage.grad_accum_steps
    causal = cfg.train.objective == "clm"
    t0 = time.time()
    reset_comm_stats()
    lr = engine.get_lr()[0]  # the rate this step's update uses (the schedule advances inside step())
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # read once, after the all-reduce
    for _ in range(accum):
        # W = 1: DeepSpeed sums the SP ranks' gradients (its divisor is DP, not DP x SP)
        loss = sp_forward_backward(engine, next(job.data), groups.sp_group, causal=causal,
                                   reset_at_doc_boundaries=cfg.data.reset_at_doc_boundaries,
                                   grad_average_size=1, backward=engine.backward)
        engine.step()  # an optimizer step only at the accumulation boundary
        loss_sum += loss.mean_loss.detach().double()
    # the logged loss is the mean over micro-batches and DP replicas (identical on SP ranks)
    dist.all_reduce(loss_sum, group=groups.dp_group)
    step_loss = float(loss_sum) / (accum * groups.dp_size)
    gn = engine.get_global_grad_norm()
    return StepResult(loss=step_loss, lr=lr, grad_norm=float(gn) if gn is not None else None,
                      applied=engine.was_step_applied() and math.isfinite(step_loss),
                      skipped_steps=int(engine.skipped_steps), seconds=max(time.time() - t0, 1e-9),
                      sp_comm_bytes=COMM_STATS.total_bytes if sp > 1 else None)


def data_record(job: Job) -> dict:
    """The data part of a step's metrics: the stage (with a schedule), per-source tokens and epochs."""
    rec = {f"data/{name}/{k}": v for name, st in job.stream.source_stats().items() for k, v in st.items()} \
        if job.cfg.data.sources else {}  # per-source figures for a mixture only
    if len(job.stages) > 1:
        rec.update(stage=job.stage.index + 1, stages=len(job.stages), seq_len=job.stage.seq_len)
    return rec


def train(cfg: Config) -> Counters:
    """Run the configured job on an initialised process group. Returns the final counters."""
    job = build_job(cfg)
    c, t = job.counters, cfg.train
    try:
        while c.step < t.max_steps:
            enter_stage(job, stage_at(job.stages, c.step))
            res = train_step(job)
            c.step += 1
            c.tokens += job.tokens_per_step
            c.consecutive_nonfinite = 0 if res.applied else c.consecutive_nonfinite + 1
            job.log.log({**step_record(c.step, c.tokens, res, job.tokens_per_step, dist.get_world_size(),
                                       job.flops_per_token, job.peak_tflops), **data_record(job)})
            if c.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                raise NonFiniteAbort(f"aborting at step {c.step}: {c.consecutive_nonfinite} consecutive steps with "
                                     f"non-finite loss/gradient (loss={res.loss}, grad_norm={res.grad_norm}); "
                                     f"limit is train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}")
            if job.evaluator is not None and job.evaluator.due(c.step, last=c.step == t.max_steps):
                rec = job.evaluator.run(job.engine, c.step)  # forward only; leaves training untouched
                job.log.log_other(rec, "eval", eval_line(rec))
            stopping = job.stop.agreed(job.engine.device)
            if c.step % cfg.checkpoint.every_steps == 0 or c.step == t.max_steps or stopping:
                job.ckpt.save(job.engine, c.step, job.state_dict(), cfg)
            if stopping:
                if dist.get_rank() == 0:
                    todo = t.max_steps - c.step
                    print(f"megatrain: stop signal: checkpoint at step {c.step} saved; " +
                          (f"{todo} steps to do: exiting {EXIT_REQUEUE} to be run again (resume=auto continues)"
                           if todo > 0 else "the run is complete"), flush=True)
                break
    finally:
        job.log.close()
        job.data.close()
    if dist.get_rank() == 0:
        print(outputs_line(cfg, c.step), flush=True)
    return c


# ---- entry point ----
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MEGA pretraining (see configs/ and megatrain/config.py)")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used instead")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 parallel.zero_stage=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit 0 done, 2 bad input (config, data found before any work), 1 a failure while training.

    Every rank finds the same bad input, so only rank 0 prints its one line; the rank comes from the launcher's
    environment (discover), known before any process group exists, and the other ranks exit 2 silently."""
    configure_host_allocator()  # first (launch/pretrain.py did it before importing torch): megatrain/host_alloc.py
    try:
        env = discover()
    except ValueError as e:  # a broken launcher environment: no rank to go by, each process says it
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2

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
        # bad input fails here, before any work
        cfg.validate(world_size=env.world_size, check_files=True, accelerator=torch.cuda.is_available())
    except (ConfigError, ValueError) as e:  # bad input: one clear line, no traceback
        say(e)
        return 2
    StopFlag()  # before the slow start-up: a preemption signal then stops cleanly instead of killing the process
    backend = init_process_group(env, cfg.parallel.backend)
    if env.rank == 0:
        print(f"megatrain: launcher={env.launcher} world={env.world_size} backend={backend} "
              f"sp={cfg.parallel.sequence_parallel_size} zero={cfg.parallel.zero_stage} run_dir={cfg.run_dir}",
              flush=True)
    try:
        counters = train(cfg)
    except ConfigError as e:  # config vs data/checkpoint, found before the first step: the same on every rank
        say(e)
        return 2
    except NonFiniteAbort as e:  # decided on all-reduced values: the same on every rank
        say(e)
        return 1
    except DataError as e:  # a shard read mid-run fails on the rank(s) reading it
        say(e, every_rank=True)
        return 1
    finally:
        dist.destroy_process_group()
    return EXIT_REQUEUE if counters.step < cfg.train.max_steps else 0


if __name__ == "__main__":
    exit_process(main())  # see megatrain.parallel.env.exit_process
