"""Megalodon's side of the transformers format: tasks, config.json <-> MegalodonConfig, the state dict. Shipped with
Megalodon's remote code; megatrain/hf/format.py (load_hf / save_hf) reads and writes folders with it.

    from megatrain.hf import megalodon
    model = megalodon.build_for_task("causal", config)          # MegalodonForCausalLM; "backbone": MegalodonBackbone
    cfg = megalodon.config_from_hf_dict(json.load(open("hf_dir/config.json")))
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_megalodon_export.py

Transformers has no Megalodon: megatrain's export is the first transformers format of it (model_type "megalodon",
remote code only). Its config.json holds MegalodonConfig's fields under their megatrain names (the run knobs
model/megalodon/config.py KNOBS left out) and its state-dict keys are megatrain's own (the identity rules of the
one key map, megatrain/hf/keymap.py). Tasks: causal (MegalodonForCausalLM) and backbone (transformers'
MegalodonModel: the bare backbone, last_hidden_state after the final timestep norm; megatrain's MegalodonModel
under `megalodon.`, MegalodonBackbone below). Megalodon is causal by design: no masked LM, and its
sequence-level heads are not exported (fine-tune the causal LM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megatrain.hf import keymap
from megatrain.model.mega.config import HF_GENERIC_KEYS
from megatrain.model.megalodon.backbone import MegalodonModel
from megatrain.model.megalodon.config import KNOBS, MegalodonConfig
from megatrain.model.megalodon.lm import MegalodonForCausalLM

FAMILY = "megalodon"
MODEL_TYPES = ("megalodon",)
ARCHS = {"causal": "MegalodonForCausalLM", "backbone": "MegalodonModel"}
TASKS = tuple(ARCHS)
# config.json keys transformers' PretrainedConfig writes besides those HF_GENERIC_KEYS names
_HF_ALSO = frozenset({"use_cache"})
# why no folder of transformers' own classes computes a Megalodon (save_hf native=True, launch/export_hf.py --native)
NATIVE_PROBLEM = "transformers has no Megalodon class of its own (no model_type 'megalodon')"


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor


class MegalodonBackbone(nn.Module):
    """megatrain's MegalodonModel under `megalodon.` (the LM's names): the bare backbone of an export. forward ->
    BackboneOutput(last_hidden_state [B, L, D], after the final timestep norm)."""

    def __init__(self, config: MegalodonConfig, backbone: Optional[MegalodonModel] = None):
        super().__init__()
        self.config = config
        self.megalodon = backbone if backbone is not None else MegalodonModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.megalodon.embed

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BackboneOutput:
        return BackboneOutput(self.megalodon(input_ids, attention_mask, token_type_ids))


_CLASSES = {"causal": MegalodonForCausalLM, "backbone": MegalodonBackbone}


def hf_to_megatrain_state_dict(sd: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    return keymap.from_hf_state_dict(sd, task, FAMILY)


def megatrain_to_hf_state_dict(sd: dict[str, torch.Tensor], task: str, config=None) -> dict[str, torch.Tensor]:
    return keymap.to_hf_state_dict(sd, task, FAMILY)


def task_of(model) -> Optional[str]:
    """The task of a megatrain Megalodon model (None: not one of this family's classes)."""
    return next((task for task, cls in _CLASSES.items() if isinstance(model, cls)), None)


def config_from_hf_dict(d: dict, where: str = "config.json") -> MegalodonConfig:
    """MegalodonConfig from a config.json dict: transformers' generic keys ignored, anything else unknown (a MEGA
    field, a typo) an error naming it."""
    names = MegalodonConfig.field_names() - set(KNOBS)
    unknown = sorted(k for k in d if k not in names and k not in HF_GENERIC_KEYS and k not in _HF_ALSO)
    if unknown:
        raise ValueError(f"{where}: unknown Megalodon field {unknown[0]!r} (all unknown: {unknown})")
    try:
        return MegalodonConfig.from_dict({k: v for k, v in d.items() if k in names})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def task_of_config(d: dict, where: str = "config.json") -> str:
    """The task a config.json describes: from `architectures` (the causal LM when it names none)."""
    found = [t for t, a in ARCHS.items() if a in (d.get("architectures") or [])]
    if len(found) > 1:
        raise ValueError(f"{where}: architectures={d['architectures']} is ambiguous; pass task= one of {found}")
    return found[0] if found else "causal"


def check_task(task: str, config: MegalodonConfig, where: str) -> None:
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: a Megalodon folder ({where}) loads as one of {', '.join(TASKS)} "
                         "(Megalodon is causal: no masked LM, no fine-tuning heads)")


def build_for_task(task: str, config: MegalodonConfig, hf_dict: Optional[dict] = None, add_pooling_layer=True):
    """The megatrain model of `task` for `config` (hf_dict, add_pooling_layer: MEGA's; unused here)."""
    check_task(task, config, "build_for_task")
    return _CLASSES[task](config)


def native_problem(config: MegalodonConfig) -> Optional[str]:
    """Why no transformers class of its own computes this model: always (see NATIVE_PROBLEM)."""
    return NATIVE_PROBLEM


def hf_config_dict(config: MegalodonConfig, task: str, model=None) -> dict:
    d = {k: v for k, v in config.to_dict().items() if k not in KNOBS}
    d.update(model_type="megalodon", architectures=[ARCHS[task]])
    return d
