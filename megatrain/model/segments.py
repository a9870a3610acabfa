"""Sequence-segmented layers: every layer runs over segments of S tokens, exactly (config.segment_size = S), for
every model family.

Use (a backbone's forward does this when config.segment_size > 0 and the input is longer than one segment):
    h = forward_segmented(backbone, input_ids, token_type_ids, SeqContext(mask, doc_ids, ema_boundary), final)
    # -> [B, L, D], as the layer loop; every (layer, segment) is the model's piece "segment" (model/pieces.py)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_segments.py tests/parallel/test_sequence_segments.py

Why: with gradient checkpointing a layer keeps only its input, but its forward -- and its recompute in backward --
still holds every intermediate of the whole sequence at once; that working set, not the kept inputs, is what makes
a train step's memory grow ~40 KB per token (hidden 256). Here each layer runs segment by segment and every
(layer, segment) piece is its own checkpoint (when checkpointing is applied) whose inputs are the segment's hidden
states and its incoming states: the backward recomputes one piece at a time, so the working set is O(S). Layer 0's
pieces start from the token ids (the embedding lookup is recomputed, it is cheap), so no embedding output of
length L is kept.

Exact because everything in a layer is per token or chunk-local (segments are whole chunks, so attention never
crosses them) except its carried states: MEGA's EMA (one per direction), Megalodon's timestep-norm statistics and
complex EMA. Each is a piece of ops/ema/state.py's recurrence and crosses segment edges through the boundary
interface every such state uses (megatrain/model/boundary.py; docs/CONTRACTS.md "EMA boundary exchange"). A
layer's boundary calls are its *slots*, keyed (direction, k) = the k-th call in that direction (MEGA: the forward
EMA, the backward EMA; Megalodon: the norm's statistics, then the EMA state -- both forward). Each piece gets a
`_Relay` that hands out its slots' incoming states and records the forward states it hands on
(local + decay * incoming).
- Left to right, no pre-pass: piece i's incoming states are piece i-1's outgoing ones; the pieces run in order.
- A pre-pass (right to left: a bidirectional EMA's incoming state comes from segments that have not run; sequence
  parallelism: the slice's summary must exist before its first piece): a layer's `edge_states(x, ctx, stage)` runs
  just enough of the layer on one segment to report its slots' (local state, decay) to a `_Capture` boundary. The
  state recurrence over the segments (state.py's prefix; with SP the slice folded (fold) and handed to
  ctx.ema_boundary once per slot -- the same exchange, in the same order, as without segments) gives every
  segment's incoming state. A layer whose later slot depends on an earlier one (Megalodon: the EMA's input is the
  norm's output, which needs the norm's incoming statistics) has `prepass_stages` > 1: stage s runs with the
  incoming states of the stages before it known. Stage 0 of layer i + 1 runs inside layer i's pieces, on their
  outputs (layer 0's: its own pieces, from the token ids), so a segment's hidden states are kept by one checkpoint.
- The layers are the backbone's `segment_stages()`: its layers, and for Megalodon the final timestep norm after
  them (a stage with one slot). `final` (a per-token function) runs inside the last stage's pieces.
- Documents: a document that starts exactly at a segment edge is invisible to both segments' states (they reset
  only at changes inside their input), so the hand-over cuts the state for those rows (state.py's `keep`).
The pre-pass costs each stage's beginning per segment and layer (forward, and again in the recompute) when
bidirectional or with SP; unidirectional without SP needs none. Dropout draws its masks per piece (feature dropout:
one mask per sample and segment), so with dropout > 0 segmented and unsegmented runs differ in their random draws.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from megatrain.model.context import SeqContext
from megatrain.ops.ema.state import DIRECTIONS, carry, cut, fold, prefix, traversal


class _Relay:
    """The boundary of one piece: hands out each slot's incoming state, records the forward states it hands on."""

    def __init__(self, incoming: dict):
        self.incoming = incoming                      # (direction, k) -> incoming state or None
        self.calls = dict.fromkeys(DIRECTIONS, 0)
        self.outgoing: dict = {}

    def __call__(self, local_state: Tensor, decay: Tensor, direction: str) -> Tensor:
        slot = (direction, self.calls[direction])
        self.calls[direction] += 1
        h_in = self.incoming.get(slot)
        if direction == "forward":
            self.outgoing[slot] = carry(local_state, decay, None, h_in)
        return torch.zeros_like(local_state) if h_in is None else h_in


class _Capture(_Relay):
    """The boundary of a pre-pass: answers the slots whose incoming state is known (earlier stages), records the
    (local state, decay) of the others (zero incoming state)."""

    def __init__(self, known: dict):
        super().__init__(known)
        self.states: dict = {}

    def __call__(self, local_state: Tensor, decay: Tensor, direction: str) -> Tensor:
        slot = (direction, self.calls[direction])
        if slot in self.incoming:
            return super().__call__(local_state, decay, direction)
        self.calls[direction] += 1
        self.states[slot] = (local_state, decay)
        return torch.zeros_like(local_state)


def _stage_input(model: nn.Module, index: int, inp: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
    return model.layer_input(index, inp, token_type_ids)


def _edge_states(model, index, stage, inp, mask, doc_ids, token_type_ids, slots=(), *known):
    """Pre-pass stage `stage` of one (layer, segment): {slot: (local state, decay)} of the slots it reaches; `known`
    the incoming states of `slots` (earlier stages). The states are positional arguments, not a dict, so that a
    checkpoint keeps (and an offloading one moves to the host) them as its inputs."""
    capture = _Capture(dict(zip(slots, known)))
    layer = model.segment_stages()[index]
    layer.edge_states(_stage_input(model, index, inp, token_type_ids), SeqContext(mask, doc_ids, capture), stage)
    return capture.states


def _piece(model, index, final, prepass_next, inp, mask, doc_ids, token_type_ids, slots=(), *incoming):
    """One (layer, segment): (output, or final(it) for the last stage, the forward states it hands on, and with
    `prepass_next` the next layer's stage-0 pre-pass states of this segment: computed here from the output, so
    that the output is kept for backward by one checkpoint only, the next layer's piece)."""
    relay = _Relay(dict(zip(slots, incoming)))
    y = model.segment_stages()[index](_stage_input(model, index, inp, token_type_ids),
                                      SeqContext(mask, doc_ids, relay))
    states = _edge_states(model, index + 1, 0, y, mask, doc_ids, None) if prepass_next else {}
    return (y if final is None else final(y)), relay.outgoing, states


def _incoming_from(states: list, slot, edges: Optional[Tensor], boundary: Optional[Callable]) -> list:
    """Every segment's incoming state of `slot` from the segments' pre-pass (local, decay); with a boundary, the
    slice's incoming state (its segments folded into one piece, exchanged) enters first."""
    direction = slot[0]
    local, decay, keep = traversal(direction, torch.stack([s[slot][0] for s in states]),
                                   torch.stack([s[slot][1] for s in states]), edges)
    h = None if boundary is None else boundary(*fold(local, decay, keep), direction)
    entering = prefix(local, decay, keep, h)
    return list((entering if direction == "forward" else entering.flip(0)).unbind(0))


def segment_bounds(length: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def forward_segmented(model: nn.Module, input_ids: Tensor, token_type_ids: Optional[Tensor], ctx: SeqContext,
                      final: Optional[Callable] = None) -> Tensor:
    """The stages of `model` (a backbone: `segment_stages()`, `layer_input`, `config.segment_size`) over whole-chunk
    segments; each (layer, segment) piece (and pre-pass piece) runs as the model's piece "segment" (an activation
    checkpoint when checkpointing is applied); `final`: a per-token function applied inside the last stage's
    pieces. -> [B, L, D]."""
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
    stages = model.segment_stages()
    n = len(stages)
    sp = ctx.ema_boundary is not None
    prepass = [layer.needs_prepass(sp) for layer in stages]
    pieces = [part(input_ids, i) for i in range(k)]
    first_states = None    # this layer's stage-0 pre-pass states per segment (from the layer before's pieces)
    for index in range(n):
        layer = stages[index]
        seg = [(part(ctx.mask, i), part(ctx.doc_ids, i), part(token_type_ids, i) if index == 0 else None)
               for i in range(k)]
        incoming = [{} for _ in range(k)]
        if prepass[index]:
            for stage in range(layer.prepass_stages):
                if stage == 0 and first_states is not None:
                    states = first_states
                else:
                    states = [model.run_piece("segment", _edge_states, model, index, stage, pieces[i], *seg[i],
                                              tuple(incoming[i]), *incoming[i].values()) for i in range(k)]
                for slot in states[0]:
                    for i, h in enumerate(_incoming_from(states, slot, edges, ctx.ema_boundary)):
                        incoming[i][slot] = h
        last = final if index == n - 1 else None
        prepass_next = index + 1 < n and prepass[index + 1]
        outputs, first_states, chain = [], [] if prepass_next else None, {}
        for i in range(k):
            enter = {**chain, **incoming[i]}
            y, outgoing, next_states = model.run_piece("segment", _piece, model, index, last, prepass_next,
                                                       pieces[i], *seg[i], tuple(enter), *enter.values())
            outputs.append(y)
            if prepass_next:
                first_states.append(next_states)
            if i + 1 < k:
                chain = {slot: cut(h, None if edges is None else edges[i + 1]) for slot, h in outgoing.items()}
        pieces = outputs
    return torch.cat(pieces, dim=1)
