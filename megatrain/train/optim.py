"""Optimizer and LR schedule (handed to ``deepspeed.initialize``; DeepSpeed/ZeRO wraps them).

Usage::

    opt = build_optimizer(model, cfg.train, guard=clip_in_optimizer(cfg))   # megatrain.parallel.zero
    sched = build_scheduler(opt, cfg.train)

* AdamW with two parameter groups: matrices decay; biases, norm scales, EMA coefficients (every tensor with
  fewer than 2 dims, plus the EMA's [K, N, 1] factors) do not.
* LR: linear warmup to ``lr``, then cosine / linear / constant down to ``lr * min_lr_ratio`` at ``max_steps``.
  The schedule is a function of (position, config): its only state is the position (updates applied; a skipped
  non-finite step holds it), so a run resumed with another ``train.max_steps`` / ``lr`` / warmup uses the new
  schedule from its very first step (``ConfigSchedule.load_state_dict`` + ``sync``).
* ``GuardedAdamW``: without ZeRO, DeepSpeed steps a plain torch optimizer and neither skips non-finite gradients
  nor reports a gradient norm. The guard takes the (already all-reduced) gradients' global norm, skips the update
  when it is not finite (``overflow``: the engine then counts a skipped step and holds the LR schedule, exactly as it
  does for its own ZeRO optimizers), else clips and steps. Under ZeRO / bf16 the optimizer is a plain
  ``torch.optim.AdamW``: DeepSpeed's wrapper does all that, and AdamW is on ZeRO's list of tested optimizers (a
  subclass is not: it would need ``zero_allow_untested_optimizer`` and DeepSpeed would warn on every start).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatrain.config import TrainCfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # EMA coefficients are [K, N, 1] / [K, N] tensors but behave like per-channel scalars: never decay them.
        if p.dim() < 2 or ".ema" in name or "ema_" in name.split(".")[-1]:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that, when ``max_norm`` is given, computes the global grad norm, skips non-finite steps, clips."""

    def __init__(self, params, max_norm: Optional[float] = None, **kw):
        super().__init__(params, **kw)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm is None:
            return super().step(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            scale = self.max_norm / (norm + 1e-6)
            if scale < 1:
                torch._foreach_mul_(grads, scale)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, t: TrainCfg, guard: bool) -> torch.optim.AdamW:
    """``guard``: megatrain.parallel.zero.clip_in_optimizer (no ZeRO/bf16 wrapper will clip, skip or measure for us)."""
    groups, kw = param_groups(model, t.weight_decay), dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    return GuardedAdamW(groups, max_norm=t.grad_clip, **kw) if guard else torch.optim.AdamW(groups, **kw)


def lr_factor(step: int, t: TrainCfg) -> float:
    """Multiplier of ``t.lr`` for the update that follows ``step`` completed updates."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


SCHEDULE_KEYS = ("lr", "min_lr_ratio", "lr_schedule", "warmup_steps", "max_steps")  # the TrainCfg fields it reads


class ConfigSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``lr = t.lr * lr_factor(position, t)``. A checkpoint keeps only the position; everything else comes from
    the config of the run that loads it."""

    def __init__(self, opt: torch.optim.Optimizer, t: TrainCfg):
        self._cfg = t
        super().__init__(opt, lambda step: lr_factor(step, t))

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state: dict) -> None:
        # older checkpoints hold LambdaLR's whole __dict__ (base_lrs, _last_lr of the old config): take the position
        self.last_epoch, self._step_count = state["last_epoch"], state["_step_count"]
        self.sync()

    def sync(self) -> None:
        """Set every group's rate from (position, config). Call after the optimizer's state is loaded too: loading
        it restores the saved ``lr`` of each param group (ZeRO loads its optimizer after the schedule)."""
        self.base_lrs = [self._cfg.lr for _ in self.optimizer.param_groups]
        # the same expression LambdaLR.get_lr evaluates, so a resumed rate is bitwise the uninterrupted one
        self._last_lr = [base * lr_factor(self.last_epoch, self._cfg) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["initial_lr"], group["lr"] = self._cfg.lr, lr


def build_scheduler(opt: torch.optim.Optimizer, t: TrainCfg) -> ConfigSchedule:
    return ConfigSchedule(opt, t)


def schedule_changes(old: TrainCfg, new: TrainCfg) -> list:
    """``["train.max_steps 3 -> 7", ...]``: the schedule fields that differ between a checkpoint's run and this one."""
    return [f"train.{k} {getattr(old, k)} -> {getattr(new, k)}" for k in SCHEDULE_KEYS
            if getattr(old, k) != getattr(new, k)]
