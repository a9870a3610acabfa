"""The pieces of the model's forward that whoever runs the model may recompute in backward.

Use (inside the model; the outside decides, megatrain/parallel/checkpointing.py):
    class MegaBlock(Pieces, nn.Module): ...
        y = self.run_piece("ffn", self.ffn, x, mask)      # = self.ffn(x, mask) unless a runner is set

The model only names its pieces; it never decides whether to checkpoint them (torchtitan's shape: the model
defines its layers, an `apply_checkpointing(model, policy)` from outside wraps them). Without a runner -- a plain
model, the exported remote code, generation -- every piece is a plain call.

The pieces (PIECES), outermost first:
- "layer":   one MegaBlock over the whole sequence (the LM head's dense + tanh folded into the last one's);
- "segment": one (layer, segment) of a sequence-segmented layer, and a segment's EMA-state pre-pass
             (megatrain/model/segments.py); used instead of "layer" when config.segment_size splits the input;
- "ema":     the EMA inside a layer (not with an SP boundary: a recompute would run the exchange again);
- "ffn":     the normalized feed-forward network inside a layer.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

PIECES = ("layer", "segment", "ema", "ffn")


class PieceRunner(Protocol):
    def __call__(self, owner: Any, name: str, fn: Callable, *args) -> Any:
        """fn(*args), however the runner likes (e.g. as an activation checkpoint); `owner` is the module whose
        piece it is (its `training` flag, its submodules), `name` one of PIECES."""


class Pieces:
    """Mixin for a module whose forward has pieces: `piece_runner` is set from outside (None: plain calls)."""

    piece_runner: Optional[PieceRunner] = None

    def run_piece(self, name: str, fn: Callable, *args):
        runner = self.piece_runner
        return fn(*args) if runner is None else runner(self, name, fn, *args)
