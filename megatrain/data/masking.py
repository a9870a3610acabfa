"""Masked-LM corruption of one window (BERT recipe), reproducible from a numpy Generator.

Use:
    from megatrain.data.masking import MaskingConfig, mask_tokens
    inputs, labels = mask_tokens(tokens, np.random.default_rng(seed), MaskingConfig(), vocab_size=V,
                                 mask_token_id=4, special_ids=[0, 1, 2, 3, 4])
Each maskable position is selected with probability ``prob`` (15%); of those, 80% become <mask>, 10% a random
non-special token, 10% stay unchanged. labels hold the original id at selected positions and -100 elsewhere.
Special tokens (EOD, pad, ...) are never selected. ShardStream seeds the generator from (seed, epoch, window index),
so masks do not depend on ranks, workers or resumption.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from megatrain.ops.lm_loss import IGNORE_INDEX



@dataclasses.dataclass
class MaskingConfig:
    prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.prob < 1.0:
            raise ValueError(f"masking prob must be in (0, 1), got {self.prob}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0:
            raise ValueError(f"mask_frac + random_frac must be within [0, 1], got {self.mask_frac} + {self.random_frac}")


@functools.lru_cache(maxsize=8)
def _normal_ids(vocab_size: int, special: tuple[int, ...]) -> np.ndarray:
    """Ids a random replacement may take: every id that is not special."""
    normal = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(special, dtype=np.int64))
    if normal.size == 0:
        raise ValueError(f"vocab of size {vocab_size} has no non-special token to draw from")
    return normal


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, cfg: MaskingConfig, vocab_size: int,
                mask_token_id: int, special_ids) -> tuple[np.ndarray, np.ndarray]:
    """Return (inputs, labels), both int64 copies; ``tokens`` is not modified."""
    inputs = tokens.astype(np.int64, copy=True)
    special = np.asarray(sorted(set(int(s) for s in special_ids)), dtype=np.int64)
    maskable = ~np.isin(inputs, special)
    selected = (rng.random(inputs.shape) < cfg.prob) & maskable
    labels = np.where(selected, inputs, IGNORE_INDEX)
    action = rng.random(inputs.shape)
    to_mask = selected & (action < cfg.mask_frac)
    to_random = selected & (action >= cfg.mask_frac) & (action < cfg.mask_frac + cfg.random_frac)
    draws = _normal_ids(vocab_size, tuple(special.tolist()))
    draws = draws[rng.integers(0, len(draws), size=inputs.shape)]
    inputs[to_mask] = mask_token_id
    inputs[to_random] = draws[to_random]
    return inputs, labels
