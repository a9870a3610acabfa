"""What travels beside the hidden states through every layer of one forward: masks, documents, EMA boundary.

    ctx = SeqContext(mask=attention_mask, doc_ids=doc_ids, ema_boundary=boundary)
    h = block(h, ctx)                     # every layer reads the same context; a decoding cache is per layer

Bundled so that a new per-sequence input (a segment's incoming EMA state, an attention block mask, ...) is one
field here instead of one more argument threaded through attention.py, blocks.py and backbone.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class SeqContext:
    mask: Optional[torch.Tensor] = None           # [B, L] 1 = real token, 0 = padding
    doc_ids: Optional[torch.Tensor] = None        # [B, L] tokens with different ids never interact
    ema_boundary: Optional[Callable] = None       # sequence parallelism: see megatrain/model/ema.py (Boundary)
