"""Run configuration: one YAML file + dotted command-line overrides -> a validated, typed config tree.

Usage::

    from megatrain.config import load_config
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=10", "parallel.sequence_parallel_size=2"])
    cfg.validate(world_size=2)          # every consistency check, before any work starts
    # the DeepSpeed JSON is generated from it: megatrain/parallel/zero.py

Sections: ``model`` (MegaConfig fields), ``data``, ``eval`` (held-out evaluation during training), ``train`` (with
``train.spike``: loss spikes), ``parallel``, ``checkpoint``, ``logging``, plus
``run_dir`` and an optional free-form ``deepspeed`` dict whose keys are merged into the generated DeepSpeed JSON
(pass-through, e.g. offload settings). Unknown keys anywhere else are errors that name the key.
A part that needs one section receives only it (``build_model(cfg.model)``, ``build_optimizer(model, cfg.train)``,
``build_scheduler(opt, cfg.train)``, ``schedule_changes(old.train, new.train)``). The few that combine sections take
the whole ``Config`` and name the keys they read in their docstrings: ``parallel/zero.py`` (train, parallel,
deepspeed), ``train/metrics.py`` ``run_flops``/``outputs_line`` (model, data.seq_len, train, logging, run_dir,
checkpoint) and ``trainer.build_stream`` (data, train.seed/objective, model.vocab_size).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from megatrain.data.remote import is_url
from megatrain.io import atomic_file
from megatrain.model.mega.config import MegaConfig
from megatrain.model.megalodon.config import MegalodonConfig


class ConfigError(ValueError):
    """A bad configuration value: the message names the offending key."""


@dataclass
class ModelCfg(MegaConfig):
    """The model section: the model's MegaConfig (HF field names/defaults + megatrain extras), plus where the
    run's weights start from. `init_from` is a run setting, not part of the model: to_dict() (what the model and
    its HF config.json see) leaves it out; the run config (Config.to_dict) keeps it.

    One run default differs from MegaConfig's (transformers') default: ``initializer_range`` unset means
    hidden_size ** -0.5 (0.088 at D = 128, 0.036 at 768), not 0.02. transformers' MEGA has no final norm and a
    dense + tanh before the tied head, so at 0.02 a small model's output path is a product of small factors
    (logits ~0.005 at D = 128): it learns the unigram through the head bias and stays there -- held-out 6.15 nats
    where D^-1/2 reaches 4.5 (bench/results/bakeoff-init-*, BENCHMARKS.md "Model quality"). MegaConfig keeps 0.02:
    a config read from a transformers folder means what transformers means, and the value only matters for
    weights a run initialises itself."""

    init_from: Optional[str] = None   # a transformers MEGA folder (native 4.57 or our export) to continue from
    initializer_range: Optional[float] = None  # None: hidden_size ** -0.5 (see above); a number: as given

    def __post_init__(self):
        if self.initializer_range is None:
            self.initializer_range = self.hidden_size ** -0.5 if isinstance(self.hidden_size, int) \
                and self.hidden_size > 0 else MegaConfig.initializer_range
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("init_from", None)
        return d


@dataclass
class MegalodonModelCfg(MegalodonConfig):
    """The model section of a Megalodon run (model.model_type: megalodon): MegalodonConfig's fields; init_from as
    ModelCfg's (a transformers MEGA folder cannot start a Megalodon run: validate says so)."""

    init_from: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("init_from", None)
        return d


# model.model_type -> the model section's class (megatrain/model/registry.py has the families); mega is the default,
# so every config without the key is the MEGA run it always was
MODEL_SECTIONS = {"mega": ModelCfg, "megalodon": MegalodonModelCfg}


@dataclass
class DataCfg:
    shards: Union[str, list] = ""        # manifest index.json (path, https:// or s3:// URL), a directory of
                                          # shards, a glob, or a list of those; or, instead, `sources`:
    sources: list = field(default_factory=list)  # a mixture: [{name, shards, weight}, ...] (megatrain/data/mixture.py)
    seq_len: int = 4096                   # with seq_len_schedule: the length the tokens per step are counted at
    seq_len_schedule: list = field(default_factory=list)  # [[step, seq_len], ...] or [[step, seq_len,
                                          # micro_batch_size, grad_accum_steps], ...]; first step 0 (data_stages)
    retries: int = 5                      # remote shards: retries of a transient failure (backoff doubles)
    retry_backoff_s: float = 1.0          # first wait before a retry
    micro_batch_size: int = 1
    num_workers: int = 0
    lanes: Optional[int] = None           # global window order (megatrain/data/stream.py); None: its default
    reset_at_doc_boundaries: bool = True  # pass doc_ids so EMA state and attention reset inside packed windows
    mask_token_id: Optional[int] = None   # mlm; None = the manifest's mask token
    skip_corrupt: bool = False
    tokenizer: Optional[str] = None       # sentencepiece model, used for samples/export only


@dataclass
class EvalCfg:
    """Held-out evaluation during training (megatrain/eval/in_training.py)."""
    shards: str = ""                      # held-out manifest (data_tools/build_shards.py --heldout-fraction); or,
    sources: list = field(default_factory=list)  # instead, one per source: [{name, shards}, ...] (each evaluated,
                                          # reported as eval/<name>/*, beside the token-weighted total)
    every_steps: int = 0                  # evaluate every N optimizer steps and at the last step; 0 = off
    tokens: int = 65536                   # held-out tokens per evaluation (whole windows: rounded up)
    seq_len: Optional[int] = None         # None: data.seq_len; may exceed it (long-context evaluation)
    micro_batch_size: Optional[int] = None  # None: data.micro_batch_size


@dataclass
class SpikeCfg:
    """Loss spikes (megatrain/train/faults.py). A step is a spike when its loss exceeds median + sigma x the
    robust standard deviation (1.4826 x MAD) of the last ``window`` steps' losses (once ``min_history`` are known),
    or its gradient norm does the same over the gradient norms (``grad_norm``). Defaults after OLMo-core's
    SkipStepOptimizer (6 standard deviations over a rolling window of 128 steps)."""
    action: str = "warn"                  # off | warn (a line) | skip (withhold the update) | rollback (PaLM:
                                          # back to the last checkpoint, the windows since then skipped)
    window: int = 128                     # steps of history
    min_history: int = 32                 # no verdict before this many steps of history
    sigma: float = 6.0                    # threshold in robust standard deviations above the median
    grad_norm: bool = True                # also judge the gradient norm (known after the update: see faults.py)
    recheck: bool = False                 # rerun a spiking / non-finite step: a different result is hardware
    skip_steps_past: int = 0              # rollback: also skip the windows of this many steps after the spike
    max_rollbacks: int = 3                # more rollbacks than this ...
    rollback_window: int = 1000           # ... within this many steps: stop (exit 1)


@dataclass
class TrainCfg:
    max_steps: int = 100
    seed: int = 0
    objective: str = "clm"                # clm | mlm
    precision: str = "fp32"               # fp32 | bf16 (bf16 weights/activations, fp32 master weights + EMA math)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1             # final lr = lr * min_lr_ratio
    lr_schedule: str = "cosine"           # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0                # 0 = off
    grad_accum_steps: int = 1
    max_consecutive_nonfinite: int = 5    # abort after this many non-finite steps in a row
    offload_activations: bool = False     # keep the checkpointed layer inputs in host memory (GPU; needs
                                          # model.gradient_checkpointing; megatrain.parallel.checkpointing)
    spike: SpikeCfg = field(default_factory=SpikeCfg)  # loss spikes (megatrain/train/faults.py)
    step_timeout_s: Optional[float] = None  # a step (or a collective in it) longer than this is a hang: stacks
                                          # to run_dir/hangs/<step>/, exit 75; None: max(step_timeout_floor_s,
                                          # 10 x the median step time)
    step_timeout_floor_s: float = 600.0   # the least a step may take before it is called a hang (None above)
    straggler_factor: float = 1.5         # a rank slower than the median rank by this factor ...
    straggler_steps: int = 20             # ... this many steps in a row is named in a warning line


@dataclass
class ParallelCfg:
    sequence_parallel_size: int = 1
    zero_stage: int = 0
    backend: str = "auto"                 # auto (nccl on GPU, gloo on CPU) | nccl | gloo; nccl = "cpu:gloo,cuda:nccl"
    timeout_s: float = 1800.0             # process-group timeout: a collective that waits longer fails


@dataclass
class CheckpointCfg:
    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"                  # auto (latest in dir, if any) | none | path to a checkpoint tag dir
    dir: Optional[str] = None             # default: <run_dir>/checkpoints


@dataclass
class WandbCfg:
    """Optional Weights & Biases logging (pip install 'megatrain[wandb]'): on when `project` is set."""
    project: str = ""
    mode: str = "offline"                 # offline (run files under run_dir/wandb; `wandb sync` later) | online
    name: Optional[str] = None            # run name; None: the run_dir's folder name


@dataclass
class LoggingCfg:
    every_steps: int = 1                  # console progress line period
    tensorboard: bool = True
    wandb: WandbCfg = field(default_factory=WandbCfg)
    peak_tflops: Optional[float] = None   # per device, for MFU; default: guessed on GPU, none on CPU


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)
    deepspeed: dict = field(default_factory=dict)  # pass-through keys merged into the generated DeepSpeed JSON

    # ---- construction ----
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, _follow_objective(d), "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
        with atomic_file(path) as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    # ---- validation ----
    def validate(self, world_size: Optional[int] = None, check_files: bool = False,
                 accelerator: Optional[bool] = None) -> "Config":
        """Every cross-field check, up front, one method per section. Raises ConfigError naming the key.
        ``check_files``: also require local data paths (no glob, no URL) to exist (the launcher does; config-file
        tests do not). ``accelerator``: whether this process trains on an accelerator (the launcher passes it;
        None = unknown)."""
        _check(bool(self.run_dir), "run_dir", self.run_dir, "must be a non-empty path")
        self._validate_train(accelerator)
        self._validate_parallel(world_size)
        self._validate_data(check_files)
        self._validate_model(check_files)
        self._validate_eval(check_files)
        self._validate_logging()
        self._validate_checkpoint()
        return self

    def _validate_train(self, accelerator: Optional[bool]) -> None:
        t, m = self.train, self.model
        _one_of("train.objective", t.objective, ("clm", "mlm"))
        _one_of("train.precision", t.precision, ("fp32", "bf16"))
        _one_of("train.lr_schedule", t.lr_schedule, ("cosine", "linear", "constant"))
        for key in ("max_steps", "grad_accum_steps", "max_consecutive_nonfinite", "straggler_steps"):
            _at_least(f"train.{key}", getattr(t, key), 1)
        _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
        _check(0 <= t.warmup_steps <= t.max_steps, "train.warmup_steps", t.warmup_steps,
               f"must be in [0, train.max_steps={t.max_steps}]")
        _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 = off)")
        _check(t.step_timeout_s is None or t.step_timeout_s > 0, "train.step_timeout_s", t.step_timeout_s,
               "must be > 0 seconds (or null: from the median step time)")
        _check(t.step_timeout_floor_s > 0, "train.step_timeout_floor_s", t.step_timeout_floor_s, "must be > 0")
        _check(t.straggler_factor > 1, "train.straggler_factor", t.straggler_factor, "must be > 1")
        if t.offload_activations:
            _check(m.gradient_checkpointing, "train.offload_activations", True,
                   "needs model.gradient_checkpointing=true (it offloads the checkpointed layer inputs)")
            # on CPU there is nowhere to offload to: a memory option that silently does nothing misleads
            _check(accelerator is not False, "train.offload_activations", True,
                   "needs a GPU (it moves checkpointed layer inputs from device to host memory; this run is on CPU)")
        self._validate_spike()

    def _validate_spike(self) -> None:
        sp = self.train.spike
        _one_of("train.spike.action", sp.action, ("off", "warn", "skip", "rollback"))
        for key in ("window", "min_history", "max_rollbacks", "rollback_window"):
            _at_least(f"train.spike.{key}", getattr(sp, key), 1)
        _check(sp.min_history <= sp.window, "train.spike.min_history", sp.min_history,
               f"must be <= train.spike.window={sp.window}")
        _check(sp.sigma > 0, "train.spike.sigma", sp.sigma, "must be > 0")
        _at_least("train.spike.skip_steps_past", sp.skip_steps_past, 0)
        # the rerun needs the step's state: only a withheld update leaves it
        _check(not sp.recheck or sp.action in ("skip", "rollback"), "train.spike.recheck", sp.recheck,
               f"needs train.spike.action=skip or rollback (the rerun starts from the state before the step; "
               f"action={sp.action} applies the update)")

    def _validate_parallel(self, world_size: Optional[int]) -> None:
        p = self.parallel
        _one_of("parallel.zero_stage", p.zero_stage, (0, 1, 2, 3))
        _one_of("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
        _at_least("parallel.sequence_parallel_size", p.sequence_parallel_size, 1)
        _check(p.timeout_s > 0, "parallel.timeout_s", p.timeout_s, "must be > 0 seconds")
        if world_size is not None:
            _check(world_size % p.sequence_parallel_size == 0, "parallel.sequence_parallel_size",
                   p.sequence_parallel_size, f"must divide the world size {world_size}")

    def _validate_data(self, check_files: bool) -> None:
        d, m, sp = self.data, self.model, self.parallel.sequence_parallel_size
        _at_least("data.seq_len", d.seq_len, 1)
        _at_least("data.micro_batch_size", d.micro_batch_size, 1)
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        _check(d.lanes is None or d.lanes >= 1, "data.lanes", d.lanes, "must be >= 1 (or null: the stream's default)")
        _check(bool(d.shards) != bool(d.sources), "data.shards", d.shards,
               "give data.shards (one corpus) or data.sources (a mixture), exactly one of them"
               if d.sources else "must name a manifest, a directory, a glob or a list (or use data.sources)")
        _check_sources(d.sources)
        _check(d.retries >= 0, "data.retries", d.retries, "must be >= 0")
        _check(d.retry_backoff_s >= 0, "data.retry_backoff_s", d.retry_backoff_s, "must be >= 0")
        if d.mask_token_id is not None:  # None: the shard manifest names it
            _check(0 <= d.mask_token_id < m.vocab_size, "data.mask_token_id", d.mask_token_id,
                   f"must be a token id in [0, model.vocab_size={m.vocab_size})")
        m.validate()  # the window rule below reads the model's chunking
        for i, st in enumerate(data_stages(self)):  # every stage of a seq_len schedule obeys the window rule
            if d.seq_len_schedule:
                _window(st.seq_len, sp, m, f"data.seq_len_schedule[{i}]", d.seq_len_schedule[i])
            else:
                _window(st.seq_len, sp, m, "data.seq_len", st.seq_len)
        if check_files:
            for key, shards in [("data.shards", d.shards or [])] + [(f"data.sources[{i}].shards", s["shards"])
                                                                      for i, s in enumerate(d.sources)]:
                for src in [shards] if isinstance(shards, str) else shards:
                    if isinstance(src, str) and not is_url(src) and not any(ch in src for ch in "*?[{"):
                        _check(os.path.exists(src), key, src, "no such file or directory")

    def _validate_model(self, check_files: bool) -> None:
        m, t = self.model, self.train
        _check(not m.init_from or isinstance(m, ModelCfg), "model.init_from", m.init_from,
               f"continues a transformers MEGA folder; this run's model.model_type is {m.model_type}")
        for key, (value, why) in OBJECTIVE_MODEL_FIELDS[t.objective].items():  # set by from_dict; a later edit?
            if not hasattr(m, key):
                continue  # a family without that setting (Megalodon is always causal)
            _check(getattr(m, key) == value, f"model.{key}", getattr(m, key),
                   f"must be {value} for train.objective={t.objective} ({why})")
        if check_files and m.init_from:  # the folder must match the model section (read config.json only)
            from megatrain.hf.init_from import check_init_from
            try:
                check_init_from(m.init_from, m)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def _validate_eval(self, check_files: bool) -> None:
        e, m, p = self.eval, self.model, self.parallel
        _check(e.every_steps >= 0, "eval.every_steps", e.every_steps, "must be >= 0 (0 = off)")
        if e.every_steps == 0:
            return
        _check_sources(e.sources, "eval.sources", ("name", "shards"))
        _check(bool(e.shards) != bool(e.sources), "eval.shards", e.shards,
               "give eval.shards (one held-out manifest) or eval.sources (one per source), exactly one of them"
               if e.sources else "must name a held-out manifest when eval.every_steps > 0 (or use eval.sources)")
        _check(self.train.objective == "clm", "eval.every_steps", e.every_steps,
               "held-out evaluation needs train.objective=clm (set eval.every_steps=0)")
        _check(e.tokens >= 1, "eval.tokens", e.tokens, "must be >= 1")
        _check(e.micro_batch_size is None or e.micro_batch_size >= 1, "eval.micro_batch_size", e.micro_batch_size,
               "must be >= 1 (or null: data.micro_batch_size)")
        seq = e.seq_len if e.seq_len is not None else self.data.seq_len
        _at_least("eval.seq_len", seq, 1)
        _window(seq, p.sequence_parallel_size, m, "eval.seq_len", seq)
        if check_files:
            for key, src in [("eval.shards", e.shards)] if e.shards else \
                    [(f"eval.sources[{i}].shards", s["shards"]) for i, s in enumerate(e.sources)]:
                _check(isinstance(src, str), key, src, "must name one held-out manifest")
                if not is_url(src):
                    _check(os.path.exists(src), key, src, "no such file or directory")

    def _validate_logging(self) -> None:
        lg = self.logging
        _at_least("logging.every_steps", lg.every_steps, 1)
        _one_of("logging.wandb.mode", lg.wandb.mode, ("offline", "online"))
        if lg.wandb.project:
            import importlib.util
            _check(importlib.util.find_spec("wandb") is not None, "logging.wandb.project", lg.wandb.project,
                   "needs the wandb package (pip install 'megatrain[wandb]'), or leave logging.wandb.project empty")

    def _validate_checkpoint(self) -> None:
        c = self.checkpoint
        _at_least("checkpoint.every_steps", c.every_steps, 1)
        _at_least("checkpoint.keep_last", c.keep_last, 1)
        if c.resume not in ("auto", "none"):
            _check(os.path.isdir(c.resume), "checkpoint.resume", c.resume,
                   "must be auto, none, or an existing checkpoint directory")


def _window(seq_len: int, sp_size: int, m: "ModelCfg", key: str, shown: Any) -> None:
    """The window rule (megatrain/parallel/sequence.py check_window) as a ConfigError naming ``key``."""
    from megatrain.parallel.sequence import check_window
    try:
        check_window(seq_len, sp_size, m, key=key, shown=shown)
    except ValueError as e:  # its messages name the keys
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class Stage:
    """One stage of the seq_len schedule: from optimizer step ``step`` on, windows of ``seq_len`` in micro-batches
    of ``micro_batch_size``, ``grad_accum_steps`` of them per step (tokens per step unchanged)."""
    index: int
    step: int
    seq_len: int
    micro_batch_size: int
    grad_accum_steps: int


def data_stages(cfg: "Config") -> list:
    """The run's stages (one without data.seq_len_schedule). Tokens per optimizer step and DP replica stay
    data.seq_len x data.micro_batch_size x train.grad_accum_steps; a stage given as [step, seq_len] keeps the
    accumulation and scales the micro-batch (or, when that is not whole, uses micro-batch 1 and scales the
    accumulation); [step, seq_len, micro_batch_size, grad_accum_steps] must give the same tokens."""
    d, t = cfg.data, cfg.train
    per_step = d.seq_len * d.micro_batch_size * t.grad_accum_steps
    if not d.seq_len_schedule:
        return [Stage(0, 0, d.seq_len, d.micro_batch_size, t.grad_accum_steps)]
    _check(isinstance(d.seq_len_schedule, list), "data.seq_len_schedule", d.seq_len_schedule,
           "must be a list of [step, seq_len] pairs")
    stages, last = [], None
    for i, entry in enumerate(d.seq_len_schedule):
        key = f"data.seq_len_schedule[{i}]"
        ok = isinstance(entry, list) and len(entry) in (2, 4) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in entry)
        _check(ok, key, entry, "must be [step, seq_len] or [step, seq_len, micro_batch_size, grad_accum_steps] "
                               "(integers)")
        step, seq_len = entry[0], entry[1]
        _check(step == 0 if i == 0 else True, key, entry, "the first stage must start at step 0")
        _check(last is None or step > last, key, entry, f"steps must increase (the stage before starts at {last})")
        _check(seq_len >= 1, key, entry, "seq_len must be >= 1")
        if len(entry) == 4:
            mb, accum = entry[2], entry[3]
            _check(mb >= 1 and accum >= 1, key, entry, "micro_batch_size and grad_accum_steps must be >= 1")
        elif (per_step // t.grad_accum_steps) % seq_len == 0:
            mb, accum = per_step // t.grad_accum_steps // seq_len, t.grad_accum_steps
        else:
            mb, accum = 1, per_step // seq_len
        _check(mb * accum * seq_len == per_step, key, entry,
               f"tokens per step must stay data.seq_len x data.micro_batch_size x train.grad_accum_steps = "
               f"{per_step} per DP replica (got {mb} x {accum} x {seq_len}); give [step, seq_len, "
               f"micro_batch_size, grad_accum_steps] or change data.seq_len")
        stages.append(Stage(i, step, seq_len, mb, accum))
        last = step
    return stages


def stage_at(stages: list, step: int):
    """The stage that optimizer step ``step`` (0-based: the step about to run) belongs to."""
    current = stages[0]
    for st in stages:
        if st.step <= step:
            current = st
    return current


def _check_sources(sources: Any, where: str = "data.sources", fields: tuple = ("name", "shards", "weight")) -> None:
    """A list of named sources (data.sources: a mixture; eval.sources: held-out sets, without weights)."""
    shape = "{" + ", ".join(fields) + "}"
    _check(isinstance(sources, list), where, sources, f"must be a list of {shape}")
    names = set()
    for i, s in enumerate(sources):
        key = f"{where}[{i}]"
        _check(isinstance(s, dict), key, s, f"must be a mapping {shape}")
        unknown = set(s) - set(fields)
        _check(not unknown, f"{key}.{sorted(unknown)[0] if unknown else ''}", None,
               f"unknown key (a source has {', '.join(fields)})")
        _check(isinstance(s.get("name"), str) and bool(s.get("name")) and "/" not in s["name"], f"{key}.name",
               s.get("name"), "must be a non-empty name without '/'")
        _check(s["name"] not in names, f"{key}.name", s["name"], "duplicate source name")
        names.add(s["name"])
        _check(bool(s.get("shards")) and isinstance(s.get("shards"), (str, list)), f"{key}.shards", s.get("shards"),
               "must name a manifest, a directory, a glob or a list")
        w = s.get("weight", 1.0)
        _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and w != float("inf"),
               f"{key}.weight", w, f"must be a number > 0 (source {s['name']!r})")


# train.objective decides what the model is; these model fields follow it unless set to a compatible value.
OBJECTIVE_MODEL_FIELDS = {
    "clm": {"is_decoder": (True, "causal attention"), "bidirectional": (False, "a bidirectional EMA sees the future")},
    "mlm": {"is_decoder": (False, "masked LM attention is bidirectional")},
}


def _follow_objective(tree: dict) -> dict:
    """Fill the model fields the objective decides (is_decoder; bidirectional for clm) into a raw config tree;
    an explicit contradicting value is an error naming both keys."""
    if not isinstance(tree, dict) or not isinstance(tree.get("train", {}) or {}, dict):
        return tree  # _build reports the shape error
    objective = (tree.get("train") or {}).get("objective", TrainCfg.objective)
    _one_of("train.objective", objective, tuple(OBJECTIVE_MODEL_FIELDS))
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        return tree
    model = dict(model)
    section, _ = _model_section(model)
    fields = {f.name for f in dataclasses.fields(section)}
    if objective == "mlm" and section is MegalodonModelCfg:
        raise ConfigError("train.objective=mlm: model.model_type=megalodon is causal by design (its timestep norm "
                          "and complex EMA see only the past); use train.objective=clm")
    for key, (value, why) in OBJECTIVE_MODEL_FIELDS[objective].items():
        if key not in fields:
            continue  # a family without that setting (Megalodon is always causal)
        if key in model and not isinstance(model[key], bool):
            continue  # a type error: _build names it
        if key in model and model[key] != value:
            raise ConfigError(f"model.{key}={model[key]!r} contradicts train.objective={objective} ({why}); "
                              f"leave model.{key} unset (it follows the objective) or set it to {value}")
        model[key] = value
    return {**tree, "model": model}


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _at_least(key: str, value: Any, low: int) -> None:
    _check(value >= low, key, value, f"must be >= {low}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, key, value, f"must be one of {', '.join(map(str, allowed))}")


# ---- dict -> dataclass, with types checked per field ----
def _build(cls, d: Any, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if tp is ModelCfg:  # the model section's class follows its model_type
            tp, v = _model_section(v if v is not None else {})
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # MegaConfig validates itself at construction; say which section failed
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _model_section(d: Any) -> tuple:
    """(the model section's class, the section without a default model_type key) of a raw model section; an
    unknown family, or a key of another family's section, is one ConfigError naming the key."""
    if not isinstance(d, dict):
        return ModelCfg, d                 # _build names the shape error
    model_type = d.get("model_type", "mega")
    _one_of("model.model_type", model_type, tuple(MODEL_SECTIONS))
    section = MODEL_SECTIONS[model_type]
    if section is ModelCfg:
        d = {k: v for k, v in d.items() if k != "model_type"}
    own = {f.name for f in dataclasses.fields(section)}
    for k in d:
        other = [t for t, cls in MODEL_SECTIONS.items() if cls is not section and
                 k in {f.name for f in dataclasses.fields(cls)}]
        if k not in own and other:
            raise ConfigError(f"model.{k}: a {other[0]} setting, not one of model.model_type={model_type} "
                              f"(set model.model_type={other[0]}, or remove model.{k})")
    return section, d


def _coerce(v: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's type (int or "1e-4" -> float; nothing else is guessed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={v!r}: expected {' or '.join(_tname(a) for a in args)}")
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
    elif tp in (list, dict):
        if isinstance(v, tp):
            return copy.deepcopy(v)
    else:  # pragma: no cover - a field type this module does not handle is a programming error
        raise TypeError(f"unsupported config field type {tp} for {key}")
    raise ConfigError(f"{key}={v!r}: expected {_tname(tp)}, got {type(v).__name__}")


def _tname(tp) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# ---- YAML + dotted overrides ----
def apply_override(tree: dict, item: str) -> None:
    """Apply one ``a.b=value`` override to a plain dict tree (value parsed as YAML: 3, 1e-4, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: Optional[str], overrides: Optional[list] = None) -> Config:
    """Load YAML (or start from defaults with path=None), apply dotted overrides, build typed sections."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        apply_override(tree, item)
    return Config.from_dict(tree)
