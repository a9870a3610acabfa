"""Sequence-segmented layers: every layer runs over segments of S tokens, exactly (MegaConfig.segment_size = S).

Use (MegaModel.forward does this when config.segment_size > 0 and the input is longer than one segment):
    h = forward_segmented(mega_model, input_ids, token_type_ids, SeqContext(mask, doc_ids, ema_boundary))
    # -> [B, L, D], as the layer loop; every (layer, segment) is the model's piece "segment" (model/pieces.py)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_segments.py tests/parallel/test_sequence_segments.py

Why: with gradient checkpointing a layer keeps only its input, but its forward -- and its recompute in backward --
still holds every intermediate of the whole sequence at once; that working set, not the kept inputs, is what makes
a train step's memory grow ~40 KB per token (hidden 256). Here each layer runs segment by segment and every
(layer, segment) piece is its own checkpoint (when checkpointing is applied) whose inputs are the segment's hidden states and its incoming EMA
states ([B, D, N]): the backward recomputes one piece at a time, so the working set is O(S). Layer 0's pieces start
from the token ids (the embedding lookup is recomputed, it is cheap), so no embedding output of length L is kept.

Exact because everything in a MEGA layer is per token or chunk-local (segments are whole chunks, so attention never
crosses them; the norms allowed here are per token) except the EMA, which is linear in its incoming state. The
state crosses segment edges through the EMA's boundary interface (docs/CONTRACTS.md "EMA boundary exchange"):
each piece's EMA gets a `boundary` callable (_Relay) that returns the precomputed incoming state of a direction
and records the forward state at the segment's right edge (local + decay * incoming, what the EMA carries on).
- Left to right: piece i's incoming state is piece i-1's outgoing one; the pieces run in order.
- Right to left (bidirectional): segment i's incoming state comes from the segments to its right, which have not
  run yet. A pre-pass runs only the layer's norm + EMA on each segment alone and keeps each segment's (local
  state, decay) per direction; the state recurrence right to left over them (ops/ema/state.py's prefix) gives
  every incoming state. The pre-pass of layer i + 1 runs inside layer i's pieces, on their outputs (layer 0's:
  its own checkpoints, from the token ids), so a segment's hidden states are kept for backward by one checkpoint.
- Sequence parallelism: the rank's slice is a row of segments. The pre-pass states are folded (state.py's fold)
  into the slice's (local state, decay), handed to ctx.ema_boundary once per layer and direction (the same
  exchange, in the same order, as without segments), and the slice's incoming states start the chains.
- Documents: a document that starts exactly at a segment edge is invisible to both segments' EMA (it resets only
  at changes inside its input), so the hand-over cuts the state for those rows (state.py's `keep`, as SP does).
The pre-pass costs one norm + EMA per segment and layer (forward, and again in the recompute) when bidirectional or
with SP; unidirectional without SP needs none. Dropout draws its masks per piece (feature dropout: one mask per
sample and segment), so with dropout > 0 segmented and unsegmented runs differ in their random draws only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from megatrain.model.context import SeqContext
from megatrain.ops.ema.state import DIRECTIONS, carry, cut, fold, prefix, traversal


class _Relay:
    """The EMA boundary of one piece: hands out its incoming states; records the forward state it hands on."""

    def __init__(self, forward_in: Optional[Tensor], backward_in: Optional[Tensor]):
        self.incoming = {"forward": forward_in, "backward": backward_in}
        self.forward_out: Optional[Tensor] = None

    def __call__(self, local_state: Tensor, decay: Tensor, direction: str) -> Tensor:
        h_in = self.incoming[direction]
        if direction == "forward":
            self.forward_out = carry(local_state, decay, None, h_in)
        return torch.zeros_like(local_state) if h_in is None else h_in


class _Capture:
    """The EMA boundary of the pre-pass: records (local state, decay) per direction; no incoming state."""

    def __init__(self):
        self.states: dict = {}

    def __call__(self, local_state: Tensor, decay: Tensor, direction: str) -> Tensor:
        self.states[direction] = (local_state, decay)
        return torch.zeros_like(local_state)


def _layer_input(model: nn.Module, index: int, inp: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
    return model.embeddings(inp, token_type_ids) if index == 0 else inp


def _piece(model, index, final, prepass_next, inp, forward_in, backward_in, mask, doc_ids, token_type_ids):
    """One (layer, segment): (layer output, or final(it) -- see MegaModel.forward --, forward EMA state after the
    segment's last position, then with `prepass_next` the next layer's pre-pass states of this segment: computed
    here from the output, so that the output is kept for backward by one checkpoint only, the next layer's piece)."""
    relay = _Relay(forward_in, backward_in)
    y = model.layers[index](_layer_input(model, index, inp, token_type_ids), SeqContext(mask, doc_ids, relay))
    states = _edge_states(model, index + 1, y, mask, doc_ids, None) if prepass_next else ()
    return (y if final is None else final(y), relay.forward_out, *states)


def _edge_states(model, index, inp, mask, doc_ids, token_type_ids):
    """Pre-pass of one (layer, segment): the EMA states the segment alone produces at its far edges and the decay
    across it, (forward local, forward decay, backward local, backward decay); None for a missing direction."""
    attn = model.layers[index].attn
    capture = _Capture()
    attn.ema(attn.ema_input(_layer_input(model, index, inp, token_type_ids), mask), mask=mask, doc_ids=doc_ids,
             boundary=capture)
    return tuple(t for d in DIRECTIONS for t in capture.states.get(d, (None, None)))


def _incoming_states(states: list, edges: Optional[Tensor], boundary: Optional[Callable]):
    """From the pre-pass states: (forward incoming state of segment 0, backward incoming state of every segment).
    edges [K+1, B] bool: the state crosses edge e (between segments e-1 and e), see ops/ema/state.py."""
    k = len(states)
    forward_in, backward_in = None, [None] * k
    if boundary is not None:
        # the slice as a whole, as the unsegmented EMA would report it to the SP exchange
        local = torch.stack([s[0] for s in states])
        forward_in = boundary(*fold(*traversal("forward", local, torch.stack([s[1] for s in states]), edges)),
                              "forward")
    if states[0][2] is not None:
        local, decay, keep = traversal("backward", torch.stack([s[2] for s in states]),
                                       torch.stack([s[3] for s in states]), edges)
        h = None if boundary is None else boundary(*fold(local, decay, keep), "backward")
        backward_in = list(prefix(local, decay, keep, h).flip(0).unbind(0))
    return forward_in, backward_in


def segment_bounds(length: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def forward_segmented(model: nn.Module, input_ids: Tensor, token_type_ids: Optional[Tensor], ctx: SeqContext,
                      final: Optional[Callable] = None) -> Tensor:
    """The embeddings + layers of `model` (a MegaModel) over whole-chunk segments of config.segment_size tokens;
    each (layer, segment) piece (and pre-pass piece) runs as the model's piece "segment" (an activation checkpoint
    when checkpointing is applied); `final`: a per-token function applied inside the last layer's pieces.
    -> [B, L, D]."""
    bounds = segment_bounds(input_ids.shape[1], model.config.segment_size)
    k = len(bounds)

    def part(t: Optional[Tensor], i: int) -> Optional[Tensor]:
        return None if t is None else t[:, bounds[i][0]:bounds[i][1]]

    # edges[e]: [B] bool, False where a document starts exactly at edge e (segment e's first position); the outer
    # edges 0 and K carry whatever the slice's boundary hands over
    edges = None
    if ctx.doc_ids is not None:
        ones = torch.ones_like(ctx.doc_ids[:, 0], dtype=torch.bool)
        edges = torch.stack([ones] + [ctx.doc_ids[:, s] == ctx.doc_ids[:, s - 1] for s, _ in bounds[1:]] + [ones])
    pieces = [part(input_ids, i) for i in range(k)]
    n = len(model.layers)
    prepass = [layer.attn.ema.bidirectional or ctx.ema_boundary is not None for layer in model.layers]
    states = None     # this layer's pre-pass states per segment (layer 0: from the token ids, its own pieces)
    if prepass[0]:
        states = [model.run_piece("segment", _edge_states, model, 0, pieces[i], part(ctx.mask, i),
                                  part(ctx.doc_ids, i), part(token_type_ids, i)) for i in range(k)]
    for index in range(n):
        seg = [(part(ctx.mask, i), part(ctx.doc_ids, i), part(token_type_ids, i) if index == 0 else None)
               for i in range(k)]
        forward_in, backward_in = None, [None] * k
        if states is not None:
            forward_in, backward_in = _incoming_states(states, edges, ctx.ema_boundary)
        last = final if index == n - 1 else None
        prepass_next = index + 1 < n and prepass[index + 1]
        outputs, states = [], [] if prepass_next else None
        for i in range(k):
            y, forward_out, *next_states = model.run_piece("segment", _piece, model, index, last, prepass_next,
                                                           pieces[i], forward_in, backward_in[i], *seg[i])
            outputs.append(y)
            if prepass_next:
                states.append(tuple(next_states))
            forward_in = cut(forward_out, None if edges is None else edges[i + 1]) if i + 1 < k else None
        pieces = outputs
    return torch.cat(pieces, dim=1)
