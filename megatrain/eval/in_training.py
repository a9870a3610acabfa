"""Held-out evaluation inside a training run: the config section ``eval`` and the trainer's one hook.

Use (megatrain/train/trainer.py)::

    ev = TrainingEval.build(cfg, groups, device)      # None when eval.every_steps == 0; reads the windows once
    if ev is not None and ev.due(step, last=step == max_steps):
        rec = ev.run(engine, step)                    # {"step", "eval_loss", "eval_ppl", "eval_bpb", "eval_tokens",
                                                      #  "eval_seconds"}: metrics.jsonl, TensorBoard eval/*, a line

Every ``eval.every_steps`` steps and at the last step, every rank evaluates the same fixed held-out windows
(megatrain/eval/heldout.py) under the job's DP x SP layout, through the engine's own forward (every ZeRO stage),
without gradients, in eval mode and back, with the torch RNG state restored: the training stream, RNG, counters
and weights are untouched, so a run with evaluation trains bit for bit as one without (and resumes so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatrain.eval.heldout import HeldOut, load_heldout
from megatrain.eval.loss import evaluate_windows


def eval_seq_len(cfg) -> int:
    return cfg.eval.seq_len or cfg.data.seq_len


def _train_manifest(shards):
    """The training data's manifest path, when data.shards names one local manifest (else nothing to compare)."""
    if not isinstance(shards, str) or "://" in shards or shards.startswith("pipe:"):
        return None
    path = os.path.join(shards, "index.json") if os.path.isdir(shards) else shards
    return path if path.endswith(".json") and os.path.isfile(path) else None


@dataclass
class TrainingEval:
    cfg: object
    groups: object
    heldout: HeldOut

    @classmethod
    def build(cls, cfg, groups, device=None):
        """The hook of a run, or None (eval.every_steps == 0). Reads the held-out windows now (before the model is
        built: a bad held-out manifest fails before any heavy work); ValueError naming eval.shards."""
        e = cfg.eval
        if e.every_steps == 0:
            return None
        held = load_heldout(e.shards, eval_seq_len(cfg), e.tokens, vocab_size=cfg.model.vocab_size,
                            train_data=_train_manifest(cfg.data.shards))
        return cls(cfg=cfg, groups=groups, heldout=held)

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.eval.every_steps == 0 or last

    def run(self, engine, step: int) -> dict:
        g, c = self.groups, self.cfg
        res = evaluate_windows(engine, self.heldout, c.eval.micro_batch_size or c.data.micro_batch_size,
                               reset_at_doc_boundaries=c.data.reset_at_doc_boundaries, sp_group=g.sp_group,
                               sp_rank=g.sp_rank, sp_size=g.sp_size, dp_rank=g.dp_rank, dp_size=g.dp_size,
                               device=engine.device)
        s = res.summary()
        return {"step": step, "eval_loss": s["loss"], "eval_ppl": s["ppl"], "eval_bpb": s["bpb"],
                "eval_tokens": s["tokens"], "eval_seconds": res.seconds}


def eval_line(rec: dict) -> str:
    """The console line of one evaluation."""
    bpb = f" | bpb {rec['eval_bpb']:.4f}" if rec.get("eval_bpb") is not None else ""
    return (f"eval step {rec['step']} | loss {rec['eval_loss']:.4f} | ppl {rec['eval_ppl']:.2f}{bpb} | "
            f"tokens {rec['eval_tokens']} | {rec['eval_seconds']:.1f}s")
