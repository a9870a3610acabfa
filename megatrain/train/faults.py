"""The faults nobody causes, judged while training: loss spikes, hardware that computes wrong, hangs, stragglers.

Used by megatrain/train/trainer.py (the loop holds one of each)::

    spikes = SpikeDetector(cfg.train.spike)        # history of losses / gradient norms, saved in checkpoints
    thr = spikes.loss_threshold()                  # before the step: the device withholds an update above it
    verdict = spikes.judge(step, loss, grad_norm, withheld)   # after the step: None or a Spike
    dog = Watchdog(run_dir, rank, world, host); dog.arm(step, "step", seconds); ...; dog.disarm()
    lag = Stragglers(factor, steps); line = lag.observe(step, per_rank_seconds)

* Spikes: a step is a spike when its loss exceeds median + sigma x 1.4826 x MAD (the robust standard deviation)
  of the last ``window`` steps' losses, once ``min_history`` are known; or its gradient norm does, over the norms
  (``grad_norm``). Defaults after OLMo-core's SkipStepOptimizer (6 standard deviations, 128 steps). Spikes and
  non-finite steps do not enter the history. The trainer decides a *loss* spike on the device before the update
  (no host sync): the last micro-batch's backward is scaled by NaN, and every optimizer path (our GuardedAdamW,
  DeepSpeed's ZeRO optimizers) treats the step as non-finite: no update, a skipped step counted, the LR schedule
  held. A gradient norm is known only after DeepSpeed's optimizer step applied the (clipped) update, so a
  gradient-norm spike cannot be withheld: ``skip`` reports it, ``rollback`` rolls it back.
* Hardware or data: ``recheck`` reruns the withheld step's forwards from the same state (weights, RNG, windows)
  and compares every rank's own loss bitwise: a difference is the hardware (HardwareFault: the trainer exits
  EXIT_HARDWARE naming rank and host), none is the data (the action goes on).
* Hangs: a thread per rank waits for the armed phase's deadline. Past it, it writes this process's Python stacks
  (faulthandler, every thread) to ``run_dir/hangs/<step>/rank<r>.txt``, posts its progress (how far into the step
  it got) to the process group's store, and exits EXIT_REQUEUE; rank 0 first names the slowest rank (least
  progress; one that never answered is named as such) in one line. The main thread may be stuck inside a
  collective: nothing here needs it, or the process group.
* Stragglers: each step's per-rank busy time (to the step's loss reduction); a rank slower than the median rank by
  ``factor`` for ``steps`` steps in a row is named in a warning line (once, until it recovers).
"""
from __future__ import annotations

import faulthandler
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal data


class SpikeAbort(RuntimeError):
    """More rollbacks than train.spike.max_rollbacks within train.spike.rollback_window steps."""


class HardwareFault(RuntimeError):
    """A rerun of the same step from the same state gave another result on some rank."""


def host_name() -> str:
    return socket.gethostname()


@dataclass
class Spike:
    step: int
    signal: str         # "loss" | "grad_norm"
    value: float
    threshold: float
    median: float
    sigma: float        # the robust standard deviation of the history
    withheld: bool      # the update was not applied (a loss spike decided on the device)

    def describe(self) -> str:
        return (f"step {self.step} {self.signal} {self.value:.4g} > threshold {self.threshold:.4g} (median "
                f"{self.median:.4g} + {(self.threshold - self.median) / self.sigma if self.sigma else 0:.3g} x "
                f"{self.sigma:.3g})")

    def record(self) -> dict:
        return asdict(self)


def robust_threshold(history, sigmas: float) -> Optional[tuple]:
    """(threshold, median, robust sigma) of the history, or None when it is empty."""
    if not history:
        return None
    med = statistics.median(history)
    sd = MAD_TO_SIGMA * statistics.median(abs(x - med) for x in history)
    return med + sigmas * sd, med, sd


class SpikeDetector:
    def __init__(self, cfg):
        self.cfg = cfg
        self.losses: deque = deque(maxlen=cfg.window)
        self.grad_norms: deque = deque(maxlen=cfg.window)
        self.rollbacks: list = []   # [{"spike_step", "to_step"}, ...] of this run, kept across rollbacks

    @property
    def on(self) -> bool:
        return self.cfg.action != "off"

    @property
    def withholds(self) -> bool:
        """Whether a loss spike's update is withheld on the device (skip and rollback; recheck needs it too)."""
        return self.cfg.action in ("skip", "rollback")

    def _threshold(self, history) -> Optional[tuple]:
        if not self.on or len(history) < self.cfg.min_history:
            return None
        return robust_threshold(list(history), self.cfg.sigma)

    def loss_threshold(self) -> Optional[float]:
        t = self._threshold(self.losses)
        return None if t is None else t[0]

    def judge(self, step: int, loss: float, grad_norm: Optional[float], withheld: bool) -> Optional[Spike]:
        """The verdict on a finished step; a normal finite step joins the history."""
        if not self.on:
            return None
        lt = self._threshold(self.losses)
        if lt is not None and (withheld or (math.isfinite(loss) and loss > lt[0])):
            return Spike(step, "loss", loss, *lt, withheld=withheld)
        gt = self._threshold(self.grad_norms) if self.cfg.grad_norm else None
        if gt is not None and grad_norm is not None and math.isfinite(grad_norm) and grad_norm > gt[0]:
            return Spike(step, "grad_norm", grad_norm, *gt, withheld=False)
        if math.isfinite(loss):
            self.losses.append(loss)
            if grad_norm is not None and math.isfinite(grad_norm):
                self.grad_norms.append(grad_norm)
        return None

    def count_rollbacks(self, step: int) -> int:
        return sum(1 for r in self.rollbacks if r["spike_step"] > step - self.cfg.rollback_window)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict, rollbacks: bool = True) -> None:
        self.losses = deque(state.get("losses", []), maxlen=self.cfg.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.cfg.window)
        if rollbacks:
            self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]


# ---- hangs ----
def step_deadline(fixed: Optional[float], floor: float, seconds: list, first: bool) -> float:
    """The seconds a step may take: ``train.step_timeout_s``, else max(floor, 10 x the median of the recent step
    times); the first step of a process (compilation, first reads) gets 3 x that."""
    base = fixed if fixed is not None else max(floor, 10 * statistics.median(seconds) if seconds else floor)
    return base * (3 if first else 1)


class Watchdog:
    """One per rank (see the module docstring). ``arm`` at the start of a phase, ``tick`` as the step moves on (a
    counter; no lock, no syscall), ``disarm`` at its end."""

    REPORT_WAIT_S = 15.0    # how long rank 0 waits for the other ranks' reports
    EXIT = 75               # trainer.EXIT_REQUEUE (kept here: the trainer imports this module)

    def __init__(self, run_dir: str, rank: int, world: int, store=None, nonce: str = ""):
        self.run_dir, self.rank, self.world, self.store, self.nonce = run_dir, rank, world, store, nonce
        self.host = host_name()
        self.progress = 0
        self._armed: Optional[tuple] = None   # (step, phase, deadline, seconds)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, name="megatrain-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step: int, phase: str, seconds: float) -> None:
        with self._cv:
            self._armed = (step, phase, time.monotonic() + seconds, seconds)
            self._cv.notify()

    def tick(self) -> None:
        self.progress += 1

    def disarm(self) -> None:
        with self._cv:
            self._armed = None
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._cv:
            while not self._stop:
                if self._armed is None:
                    self._cv.wait()
                    continue
                left = self._armed[2] - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                step, phase, _, seconds = self._armed
                break
            else:
                return
        self._fire(step, phase, seconds)

    def _fire(self, step: int, phase: str, seconds: float) -> None:
        folder = os.path.join(self.run_dir, "hangs", str(step))
        path = os.path.join(folder, f"rank{self.rank}.txt")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank} host {self.host} pid {os.getpid()}: step {step} {phase} exceeded "
                        f"{seconds:.0f} s; progress {self.progress}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            print(f"megatrain: watchdog: cannot write {path}: {e}", file=sys.stderr, flush=True)
        mine = {"rank": self.rank, "host": self.host, "progress": self.progress, "phase": phase}
        key = f"megatrain/hang/{self.nonce}/{step}"
        reports = {self.rank: mine}
        if self.store is not None and self.world > 1:
            try:
                self.store.set(f"{key}/{self.rank}", json.dumps(mine))
                if self.rank == 0:
                    reports = self._collect(key, reports)
                else:  # let rank 0 print its line before a launcher kills everyone for this exit
                    self.store.wait([f"{key}/done"], _timedelta(self.REPORT_WAIT_S + 5))
            except Exception as e:  # the store's host may be gone too: still exit, with what we know
                print(f"megatrain: watchdog: rank {self.rank}: store unreachable ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
        if self.rank == 0:
            print(hang_line(step, phase, seconds, reports, self.world, folder), flush=True)
            if self.store is not None and self.world > 1:
                try:
                    self.store.set(f"{key}/done", "1")
                except Exception:
                    pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.EXIT)

    def _collect(self, key: str, reports: dict) -> dict:
        end = time.monotonic() + self.REPORT_WAIT_S
        while time.monotonic() < end and len(reports) < self.world:
            for r in range(self.world):
                if r not in reports and self.store.check([f"{key}/{r}"]):
                    reports[r] = json.loads(self.store.get(f"{key}/{r}"))
            time.sleep(0.1)
        return reports


def _timedelta(seconds: float):
    import datetime
    return datetime.timedelta(seconds=seconds)


def hang_line(step: int, phase: str, seconds: float, reports: dict, world: int, folder: str) -> str:
    silent = [r for r in range(world) if r not in reports]
    if silent:
        who = f"rank {silent[0]} (no answer: dead or frozen)"
    else:
        slow = min(reports.values(), key=lambda r: (r["progress"], r["rank"]))
        who = f"rank {slow['rank']} (host {slow['host']}, progress {slow['progress']} of the step's marks; the " \
              f"others {max(r['progress'] for r in reports.values())})"
    return (f"megatrain: hang: step {step} ({phase}) exceeded {seconds:.0f} s (train.step_timeout_s); slowest "
            f"{who}; stacks of every rank in {folder}; exiting {Watchdog.EXIT} to be requeued (resume=auto "
            f"continues from the last checkpoint)")


# ---- stragglers ----
class Stragglers:
    def __init__(self, factor: float, steps: int):
        self.factor, self.steps = factor, steps
        self.behind: dict = {}
        self.named: set = set()

    def observe(self, step: int, seconds: list, hosts: Optional[list] = None) -> Optional[str]:
        """A warning line when a rank has been slower than the median rank by ``factor`` for ``steps`` steps."""
        if len(seconds) < 2:
            return None
        med = statistics.median(seconds)
        lines = []
        for r, s in enumerate(seconds):
            if med > 0 and s > self.factor * med:
                self.behind[r] = self.behind.get(r, 0) + 1
            else:
                self.behind.pop(r, None)
                self.named.discard(r)
            if self.behind.get(r, 0) >= self.steps and r not in self.named:
                self.named.add(r)
                where = f" (host {hosts[r]})" if hosts else ""
                lines.append(f"megatrain: warning: straggler: rank {r}{where} has been slower than the median rank "
                             f"by more than {self.factor:g}x for {self.behind[r]} steps (step {step}: {s:.3f} s vs "
                             f"{med:.3f} s); per-rank times are in metrics.jsonl (rank_seconds)")
        return "\n".join(lines) or None
