"""The model families and what the rest of megatrain needs of each (torchtitan's "train spec" shape).

    from megatrain.model.registry import MODEL_TYPES, build_model, model_spec
    spec = model_spec("megalodon")        # ModelSpec: name, config class, build, the LM classes, the pieces
    model = build_model(config)           # dispatches on config.model_type ("mega" | "megalodon")
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_registry.py

A family lives in its own folder (megatrain/model/mega/, megatrain/model/megalodon/) and answers one contract:
its LM is a megatrain.model.lm.LanguageModel (the keyword API training and every evaluation call, the decoding
cache), its modules with pieces are megatrain.model.pieces.Pieces (activation checkpointing and offload are applied
to them from outside, megatrain/parallel/checkpointing.py), its states cross pieces through the boundary interface
(megatrain/model/boundary.py: segments, sequence parallelism), and ZeRO shards whatever parameters the LM has
(nothing family-specific). Neither family imports anything distributed. What both share is written once:
model/lm.py (head, loss, forward contract), context.py, pieces.py, boundary.py, segments.py, generate.py,
layers.py; ops/ema/state.py (the state recurrence), ops/attention (chunked attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from megatrain.model.mega.config import MegaConfig
from megatrain.model.mega.lm import MegaForCausalLM, MegaForMaskedLM, build_mega
from megatrain.model.megalodon.config import MegalodonConfig
from megatrain.model.megalodon.lm import MegalodonForCausalLM, build_megalodon
from megatrain.model.pieces import PIECES


@dataclass(frozen=True)
class ModelSpec:
    name: str                       # model.model_type in a run config
    config_class: type              # its settings (a dataclass with to_dict / from_dict / validate)
    build: Callable[..., nn.Module]  # config -> the language model of a run
    lm_classes: tuple               # the LanguageModel classes it builds
    objectives: tuple               # train.objective values it supports
    pieces: tuple = PIECES          # the pieces its forward names (megatrain/model/pieces.py)


MODEL_SPECS = {
    "mega": ModelSpec("mega", MegaConfig, build_mega, (MegaForCausalLM, MegaForMaskedLM), ("clm", "mlm")),
    "megalodon": ModelSpec("megalodon", MegalodonConfig, build_megalodon, (MegalodonForCausalLM,), ("clm",)),
}
MODEL_TYPES = tuple(MODEL_SPECS)


def model_spec(model_type: str) -> ModelSpec:
    """The family named `model_type`; a one-line ValueError naming model.model_type otherwise."""
    if model_type not in MODEL_SPECS:
        raise ValueError(f"model.model_type={model_type!r}: unknown model family; choose one of "
                         f"{', '.join(MODEL_TYPES)}")
    return MODEL_SPECS[model_type]


def build_model(config) -> nn.Module:
    """The language model of a run, by its config's family (config.model_type)."""
    return model_spec(config.model_type).build(config)
