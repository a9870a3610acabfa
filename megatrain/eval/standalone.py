"""Standalone evaluation of a model (what launch/evaluate.py runs once it has loaded SOURCE).

    from megatrain.eval.standalone import check_lengths, evaluate_model
    res = evaluate_model(model, "shards/heldout/index.json", seq_lens=[4096, 16384], tokens=1 << 20,
                         positions=True, passkey_format=fmt, sp_group=...)
    # {"source", "shards", "rows": [{"seq_len", "loss", "ppl", "bpb", "tokens", "seconds", "tokens_per_s"}],
    #  "by_position": {seq_len: [{"lo", "hi", "tokens", "loss"}]}, "passkey": [{"length", "depth", ...}]}

Every rank calls it (DP x SP: see megatrain/eval/loss.py); rank 0 shows a progress bar with ETA (tqdm) and gets
the same results as every other rank.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from tqdm import tqdm

from megatrain.eval.heldout import load_heldout
from megatrain.eval.loss import evaluate_windows
from megatrain.eval.passkey import DEPTHS, PasskeyFormat, passkey_eval


def check_lengths(seq_lens, config, sp_size: int, flag: str = "--seq-len") -> None:
    """Each length obeys the window rule (megatrain/parallel/sequence.py check_window: whole chunks per SP rank, an
    attention span the model has); ValueError naming the flag and the value. A transformers model (no chunking
    fields) takes any positive length."""
    from megatrain.parallel.sequence import check_window
    for L in seq_lens:
        if L < 1:
            raise ValueError(f"{flag} {L}: expected a positive length")
        if hasattr(config, "chunk_size") and hasattr(config, "use_chunking"):  # a megatrain family
            check_window(L, sp_size, config, key=flag, shown=L, sp_key="--sp")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def evaluate_model(model, shards: str, seq_lens: list, tokens: int, micro_batch_size: int = 1,
                   positions: bool = False, passkey_format: Optional[PasskeyFormat] = None,
                   passkey_lengths: Optional[list] = None, passkey_trials: int = 10, passkey_depths=DEPTHS,
                   reset_at_doc_boundaries: bool = True, sp_group=None,
                   dp_rank: Optional[int] = None, dp_size: Optional[int] = None, seed: int = 0,
                   show_progress: bool = True) -> dict:
    windows = {L: load_heldout(shards, L, tokens, vocab_size=model.config.vocab_size, key="--shards")
               for L in seq_lens}  # every window read before any forward: bad data fails first
    total = sum(w.num_windows for w in windows.values())
    bar = tqdm(total=total, unit="win", desc="held-out", disable=not (show_progress and _rank0()))
    res = {"shards": shards, "rows": []}
    if positions:
        res["by_position"] = {}
    for L, held in windows.items():
        bar.set_postfix_str(f"L={L}")
        r = evaluate_windows(model, held, micro_batch_size, positions=positions,
                             reset_at_doc_boundaries=reset_at_doc_boundaries, sp_group=sp_group,
                             dp_rank=dp_rank, dp_size=dp_size,
                             progress=lambda n: bar.update(min(n, bar.total - bar.n)))
        res["rows"].append({**r.summary(), "seconds": r.seconds, "tokens_per_s": r.tokens / max(r.seconds, 1e-9)})
        if positions:
            res["by_position"][str(L)] = r.by_position()
    bar.close()
    if passkey_format is not None:
        lengths = passkey_lengths or seq_lens
        pbar = tqdm(total=len(lengths) * len(passkey_depths), unit="cell", desc="passkey",
                    disable=not (show_progress and _rank0()))
        res["passkey"] = passkey_eval(model, passkey_format, lengths, passkey_depths, passkey_trials, seed,
                                      progress=pbar.update, sp_group=sp_group)
        pbar.close()
    return res
