"""Activation checkpointing and host offload, applied to a model from outside.

Use:
    from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing, policy_from_config
    apply_checkpointing(model, CheckpointPolicy())                 # recompute every piece in backward
    apply_checkpointing(model, CheckpointPolicy(offload=True))     # ... and keep their inputs in host memory
    apply_checkpointing(model, policy_from_config(cfg.model.gradient_checkpointing, cfg.train.offload_activations))
    apply_checkpointing(model, None)                               # plain again
Tests: PYTHONPATH=. python -m pytest -q tests/parallel/test_checkpointing.py

The model names the pieces of its forward (megatrain/model/pieces.py: "layer", "segment", "ema", "ffn") and runs
each through its modules' `piece_runner`; this file supplies that runner (torchtitan's shape: the model defines its
pieces, the training side wraps them). The one predicate -- a piece is recomputed when the policy names it, its
module is training and autograd records -- is `CheckpointRunner.__call__`; its state (nesting depth) lives in the
runner, not in module globals, so two models never share it.

Each checkpoint is PyTorch's non-reentrant torch.utils.checkpoint: it nests (a layer's EMA and FFN are checkpoints
inside the layer's, so while the layer is recomputed they keep only their inputs), and it restores the RNG state,
so dropout draws and gradients are identical to the plain forward's. During a recompute the model's batch norms do
not update their running statistics a second time (BatchNorm.update_stats).

Offload (`train.offload_activations`, as Arctic Long Sequence Training offloads): the tensors every *outermost*
checkpoint keeps for its recompute -- the layer (or (layer, segment) piece) inputs -- go to host memory (pinned
when CUDA is there) and come back when backward recomputes the piece, so accelerator memory per token barely grows
with depth. PyTorch's torch.autograd.graph.save_on_cpu does the moving: a non-reentrant checkpoint saves its
inputs as ordinary saved tensors under the hooks around it, while the tensors saved inside it go to its own hooks
(so nested checkpoints and recomputes are untouched). On CPU tensors the move is the identity: an exact no-op.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatrain.model.layers import BatchNorm
from megatrain.model.pieces import PIECES, Pieces


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which of the model's pieces are recomputed in backward, and whether the outermost ones' inputs are offloaded.
    The default recomputes every piece (each layer or (layer, segment), and the EMA and FFN inside)."""

    pieces: frozenset = frozenset(PIECES)
    offload: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.pieces) - set(PIECES))
        if unknown:
            raise ValueError(f"CheckpointPolicy.pieces: unknown piece(s) {unknown}; the model's are {list(PIECES)}")


def policy_from_config(gradient_checkpointing: bool, offload_activations: bool = False) -> Optional[CheckpointPolicy]:
    """The policy of a run: `model.gradient_checkpointing` (MegaConfig's field, HF's name) and
    `train.offload_activations` (validated by megatrain/config.py: it needs checkpointing and a GPU)."""
    return CheckpointPolicy(offload=offload_activations) if gradient_checkpointing else None


def _host_offload_hooks():
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


class CheckpointRunner:
    """The piece runner apply_checkpointing sets on every module with pieces (one per model: shared nesting state)."""

    def __init__(self, policy: CheckpointPolicy):
        self.policy = policy
        self._depth = 0        # checkpointed forwards running (nested ones are > 1)
        self._recomputing = 0  # recomputes running (backward re-running a checkpointed piece)

    def __call__(self, owner: nn.Module, name: str, fn: Callable, *args):
        if name not in self.policy.pieces or not (owner.training and torch.is_grad_enabled()):
            return fn(*args)
        outermost = self._depth == 0 and self._recomputing == 0
        offload = _host_offload_hooks() if self.policy.offload and outermost else contextlib.nullcontext()
        self._depth += 1
        calls = 0

        def run(*a):
            # the first call is the forward; any later one is backward recomputing the piece. Told apart here,
            # not by checkpoint's context_fn: a custom context_fn is refused under torch.compile (dynamo, and AOT
            # autograd's proxy-mode trace): tests/parallel/test_checkpointing.py::test_torch_compile
            nonlocal calls
            calls += 1
            if calls == 1:
                return fn(*a)
            with self._recompute(owner):
                return fn(*a)
        try:
            with offload:
                return checkpoint(run, *args, use_reentrant=False)
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def _recompute(self, owner: nn.Module) -> Iterator[None]:
        # the recompute runs the piece's forward again: its batch norms must not count the batch a second time
        norms = [m for m in owner.modules() if isinstance(m, BatchNorm)]
        before = [m.update_stats for m in norms]
        self._recomputing += 1
        for m in norms:
            m.update_stats = False
        try:
            yield
        finally:
            self._recomputing -= 1
            for m, old in zip(norms, before):
                m.update_stats = old


def apply_checkpointing(model: nn.Module, policy: Optional[CheckpointPolicy]) -> nn.Module:
    """Sets the runner of every module of `model` that has pieces (policy None: plain calls again) -> model.
    Parameters, buffers and state-dict keys are untouched; apply it before wrapping the model (DeepSpeed, DDP)."""
    runner = None if policy is None else CheckpointRunner(policy)
    found = False
    for m in model.modules():
        if isinstance(m, Pieces):
            m.piece_runner = runner
            found = True
    if not found:
        raise ValueError(f"apply_checkpointing: {type(model).__name__} has no pieces to checkpoint "
                         "(a megatrain model: megatrain/model/pieces.py)")
    return model
