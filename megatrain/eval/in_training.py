"""Held-out evaluation inside a training run: the config section ``eval`` and the trainer's one hook.

Use (megatrain/train/trainer.py)::

    ev = TrainingEval.build(cfg, groups, device)      # None when eval.every_steps == 0; reads the windows once
    if ev is not None and ev.due(step, last=step == max_steps):
        rec = ev.run(engine, step)                    # {"step", "eval_loss", "eval_ppl", "eval_bpb", "eval_tokens",
                                                      #  "eval_seconds"}: metrics.jsonl, TensorBoard eval/*, a line

With ``eval.sources`` (one held-out manifest per source of a mixture) each source is evaluated on its own windows;
the record adds ``eval/<name>/loss|ppl|bpb|tokens`` per source, and ``eval_loss`` etc. are the token-weighted total
over the sources (their summed losses over their summed tokens and bytes).

Every ``eval.every_steps`` steps and at the last step, every rank evaluates the same fixed held-out windows
(megatrain/eval/heldout.py) under the job's DP x SP layout, through the engine's own forward (every ZeRO stage),
without gradients, in eval mode and back, with the torch RNG state restored: the training stream, RNG, counters
and weights are untouched, so a run with evaluation trains bit for bit as one without (and resumes so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatrain.data.remote import is_url
from megatrain.eval.heldout import HeldOut, load_heldout
from megatrain.eval.loss import evaluate_windows, summarize


def eval_seq_len(cfg) -> int:
    return cfg.eval.seq_len or cfg.data.seq_len


def _local_manifest(shards):
    """The manifest path when `shards` names one local manifest (else nothing to compare)."""
    if not isinstance(shards, str) or is_url(shards):
        return None
    path = os.path.join(shards, "index.json") if os.path.isdir(shards) else shards
    return path if path.endswith(".json") and os.path.isfile(path) else None


def _train_manifest(data):
    """A local manifest of the training data (data.shards or the first local one among data.sources): the
    tokenizer every held-out set must share."""
    for shards in [data.shards] + [s["shards"] for s in data.sources]:
        path = _local_manifest(shards)
        if path is not None:
            return path
    return None


@dataclass
class TrainingEval:
    cfg: object
    groups: object
    heldouts: dict          # name -> HeldOut; one entry named "" for eval.shards

    @classmethod
    def build(cls, cfg, groups, device=None):
        """The hook of a run, or None (eval.every_steps == 0). Reads the held-out windows now (before the model is
        built: a bad held-out manifest fails before any heavy work); ValueError naming eval.shards."""
        e = cfg.eval
        if e.every_steps == 0:
            return None
        named = [("", e.shards, "eval.shards")] if e.shards else \
            [(s["name"], s["shards"], f"eval.sources[{i}].shards") for i, s in enumerate(e.sources)]
        train = _train_manifest(cfg.data)
        return cls(cfg=cfg, groups=groups, heldouts={
            name: load_heldout(path, eval_seq_len(cfg), e.tokens, vocab_size=cfg.model.vocab_size, train_data=train,
                               key=key) for name, path, key in named})

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.eval.every_steps == 0 or last

    def run(self, engine, step: int) -> dict:
        g, c = self.groups, self.cfg
        results = {name: evaluate_windows(engine, held, c.eval.micro_batch_size or c.data.micro_batch_size,
                                          reset_at_doc_boundaries=c.data.reset_at_doc_boundaries,
                                          sp_group=g.sp_group,
                                          dp_rank=g.dp_rank, dp_size=g.dp_size, device=engine.device)
                   for name, held in self.heldouts.items()}
        rs = list(results.values())
        nbytes = [r.bytes for r in rs]  # bpb of the total only when every source has its bytes
        s = summarize(sum(r.loss_sum for r in rs), sum(r.tokens for r in rs), sum(nbytes) if all(nbytes) else 0)
        rec = {"step": step, "eval_loss": s["loss"], "eval_ppl": s["ppl"], "eval_bpb": s["bpb"],
               "eval_tokens": s["tokens"], "eval_seconds": sum(r.seconds for r in rs)}
        for name, r in results.items():
            if name:
                rec.update({f"eval/{name}/{k}": v for k, v in r.summary().items() if k != "seq_len"})
        return rec


def eval_line(rec: dict) -> str:
    """The console line of one evaluation (per source: its loss, with eval.sources)."""
    bpb = f" | bpb {rec['eval_bpb']:.4f}" if rec.get("eval_bpb") is not None else ""
    per = "".join(f" | {k.split('/')[1]} {v:.4f}" for k, v in rec.items()
                  if k.startswith("eval/") and k.endswith("/loss"))
    return (f"eval step {rec['step']} | loss {rec['eval_loss']:.4f} | ppl {rec['eval_ppl']:.2f}{bpb}{per} | "
            f"tokens {rec['eval_tokens']} | {rec['eval_seconds']:.1f}s")
