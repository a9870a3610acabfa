"""Passkey retrieval (the protocol of the landmark-attention / LongLoRA evaluations): filler text, a random 5-digit
key stated at depth d of a context of L tokens, a question at the end, greedy decoding, exact match.

    from megatrain.eval.passkey import PasskeyFormat, passkey_eval
    fmt = PasskeyFormat.from_tokenizer(sp)            # sentencepiece: the English prompt below, digits one id each
    rows = passkey_eval(model, fmt, lengths=[256, 1024], depths=DEPTHS, trials=10)
    # [{"length", "depth", "accuracy", "trials"}]

A context of exactly L tokens, the answer included: a prompt of L - 5 tokens -- filler (repeated, cut to fit) with
the key sentence inserted after round(d x F) filler tokens (F = the prompt's filler tokens: d = 0 the start, 1 right
before the question), then the question -- and the 5 tokens the model answers by greedy decoding
(megatrain.generate), so that a chunked model's answer lies in the chunk of the question; a trial is right when
they are the key's digits. Keys come from a generator seeded by (seed, L, d): the same prompts every time. Under several ranks the
(L, d) cells are shared out over the DP replicas and gathered.
Under sequence parallelism (SP > 1: contexts beyond one device) a cell is scored by one teacher-forced forward of
the whole context (prompt + the key as the answer), sliced over the SP group like training windows: greedy
decoding returns the key exactly when the argmax at each of the 5 answer positions, given the key's earlier digits,
is the key's next digit -- so the two give the same accuracy (tests/eval/test_passkey.py checks it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatrain.model.generate import generate
from megatrain.parallel.protocol import forward_window, sp_place

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEY_DIGITS = 5
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
BEFORE_KEY = "The pass key is "
AFTER_KEY = ". Remember it. The pass key is the number above. "
QUESTION = "What is the pass key? The pass key is "


@dataclass
class PasskeyFormat:
    """Token ids of the prompt's parts; `digits[k]` is the id of the digit k."""
    filler: list
    before_key: list
    after_key: list
    question: list
    digits: list

    @classmethod
    def from_tokenizer(cls, sp) -> "PasskeyFormat":
        enc = [sp.encode(str(k)) for k in range(10)]  # a piece or its byte-fallback id: one id either way
        if any(len(e) != 1 for e in enc):
            raise ValueError("passkey: the tokenizer does not encode each digit 0-9 as one id (train it with "
                             "megatrain's train_tokenizer: split_digits)")
        digits = [e[0] for e in enc]
        return cls(filler=sp.encode(FILLER), before_key=sp.encode(BEFORE_KEY), after_key=sp.encode(AFTER_KEY),
                   question=sp.encode(QUESTION), digits=digits)

    def fixed_tokens(self) -> int:
        return len(self.before_key) + KEY_DIGITS + len(self.after_key) + len(self.question)

    def prompt(self, length: int, depth: float, key: str) -> list:
        """The L - 5 prompt ids of a context of `length` tokens."""
        n_fill = length - KEY_DIGITS - self.fixed_tokens()
        if n_fill < 0:
            raise ValueError(f"passkey length {length}: shorter than the key sentence, the question and the answer "
                             f"({self.fixed_tokens() + KEY_DIGITS} tokens)")
        fill = (self.filler * (n_fill // max(len(self.filler), 1) + 1))[:n_fill]
        cut = round(depth * n_fill)
        key_ids = [self.digits[int(c)] for c in key]
        return fill[:cut] + self.before_key + key_ids + self.after_key + fill[cut:] + self.question


def _keys(seed: int, length: int, depth: float, trials: int) -> list:
    rng = random.Random(f"{seed}-{length}-{depth}")
    return [str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1)) for _ in range(trials)]


@torch.no_grad()
def passkey_cell(model, fmt: PasskeyFormat, length: int, depth: float, trials: int, seed: int = 0,
                 batch_size: int = 8) -> dict:
    device = next(model.parameters()).device
    keys = _keys(seed, length, depth, trials)
    right = 0
    for i in range(0, trials, batch_size):
        ks = keys[i:i + batch_size]
        ids = torch.tensor([fmt.prompt(length, depth, k) for k in ks], device=device)
        out = generate(model, ids, max_new_tokens=KEY_DIGITS)[:, ids.shape[1]:]
        want = torch.tensor([[fmt.digits[int(c)] for c in k] for k in ks], device=device)
        right += int((out == want).all(dim=1).sum())
    return {"length": length, "depth": depth, "accuracy": right / trials, "trials": trials}


@torch.no_grad()
def passkey_cell_forced(model, fmt: PasskeyFormat, length: int, depth: float, trials: int, seed: int = 0,
                        batch_size: int = 8, sp_group=None) -> dict:
    """The same accuracy as passkey_cell from one teacher-forced forward per batch, the context sliced over the SP
    group by the window protocol (every rank of the group calls it; `length` a whole number of chunks per rank):
    the logits at the positions whose next token is an answer digit, on the ranks whose slice holds them."""
    device = next(model.parameters()).device
    keys = _keys(seed, length, depth, trials)
    _, sp_size = sp_place(sp_group)
    # positions whose next token is an answer digit: length - 6 .. length - 2 (global)
    want_pos = torch.arange(length - KEY_DIGITS - 1, length - 1, device=device)
    right = 0
    for i in range(0, trials, batch_size):
        ks = keys[i:i + batch_size]
        ids = torch.tensor([fmt.prompt(length, depth, k) + [fmt.digits[int(c)] for c in k] for k in ks],
                           device=device)
        f = forward_window(model, {"input_ids": ids}, sp_group, causal=True, logits_at=want_pos)
        pred = f.out.logits.argmax(-1)
        hits = (pred == ids[:, f.positions + 1]).sum(dim=1).cpu()
        if sp_size > 1:
            dist.all_reduce(hits, group=sp_group)
        right += int((hits == KEY_DIGITS).sum())
    return {"length": length, "depth": depth, "accuracy": right / trials, "trials": trials}


def passkey_eval(model, fmt: PasskeyFormat, lengths, depths=DEPTHS, trials: int = 10, seed: int = 0,
                 batch_size: int = 8, progress: Optional[Callable[[int], None]] = None, sp_group=None) -> list:
    """Accuracy per (length, depth) cell; collective (cells shared out over the DP replicas, each SP group working
    on one cell together) when a process group exists. `sp_group`: this rank's SP group (None: no SP)."""
    sp_rank, sp_size = sp_place(sp_group)
    cells = [(L, d) for L in lengths for d in depths]
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    replicas, replica = world // sp_size, rank // sp_size
    was = model.training
    model.eval()
    mine = []
    try:
        for i, (L, d) in enumerate(cells):
            if i % replicas == replica:
                if sp_size > 1:
                    row = passkey_cell_forced(model, fmt, L, d, trials, seed, batch_size, sp_group)
                else:
                    row = passkey_cell(model, fmt, L, d, trials, seed, batch_size)
                if sp_rank == 0:
                    mine.append((i, row))
            if progress is not None:
                progress(1)
    finally:
        model.train(was)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [x for part in gathered for x in part]
    return [row for _, row in sorted(mine, key=lambda t: t[0])]
