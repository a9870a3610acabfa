"""MEGA's side of the transformers format (transformers 4.57.x MEGA, every head): tasks, config.json <-> MegaConfig,
the state dict under transformers' names. Shipped with MEGA's remote code; megatrain/hf/format.py (load_hf /
save_hf) reads and writes folders with it.

    from megatrain.hf import mega
    model = mega.build_for_task("causal", config)     # megatrain's class for a task (TASKS)
    cfg = mega.config_from_hf_dict(json.load(open("hf_dir/config.json")))
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_parity.py tests/hf/test_hf_heads.py

Tasks (megatrain class <- transformers architecture): causal (MegaForCausalLM), masked (MegaForMaskedLM),
sequence-classification, token-classification, question-answering, multiple-choice (megatrain/model/mega/heads.py;
the label count is len(id2label) of config.json, problem_type is kept), backbone (transformers' bare MegaModel:
megatrain's MegaModelWithPooler).

rmsnorm: transformers' MegaRMSNorm computes x * weight (its normalization result is discarded). A transformers
rmsnorm checkpoint keeps that behaviour (config.hf_rmsnorm_noop=True), so logits stay what they were in
transformers; a model with a real RMSNorm (hf_rmsnorm_noop=False) is no native MEGA (native_problem).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.hf import keymap
from megatrain.model.mega.config import MegaConfig
from megatrain.model.mega.heads import (MegaForMultipleChoice, MegaForQuestionAnswering, MegaForSequenceClassification,
                                        MegaForTokenClassification, MegaModelWithPooler)
from megatrain.model.mega.lm import MegaForCausalLM, MegaForMaskedLM

FAMILY = "mega"
# MEGA's rules of the one key map (megatrain/hf/keymap.py)
KEY_TABLE = keymap.KEY_MAPS[FAMILY].rules
_CLASSES = {"causal": MegaForCausalLM, "masked": MegaForMaskedLM,
            "sequence-classification": MegaForSequenceClassification,
            "token-classification": MegaForTokenClassification,
            "question-answering": MegaForQuestionAnswering, "multiple-choice": MegaForMultipleChoice,
            "backbone": MegaModelWithPooler}
TASKS = tuple(_CLASSES)
# transformers' class names are megatrain's (the bare backbone: transformers' MegaModel)
ARCHS = {task: "MegaModel" if task == "backbone" else cls.__name__ for task, cls in _CLASSES.items()}
LM_TASKS = ("causal", "masked")
# not in transformers' config: not written to config.json (hf_rmsnorm_noop: only where it applies)
_MEGATRAIN_ONLY_FIELDS = MegaConfig.megatrain_only_fields()
# config.json keys of the classification heads (label names, problem type): the model class reads them
_HF_ONLY_FIELDS = ("id2label", "label2id", "num_labels", "problem_type")
# model_type of an export that transformers' own MEGA would compute differently (native_problem): no native
# class is registered for it, so only trust_remote_code=True loads it
REMOTE_ONLY_MODEL_TYPE = "megatrain_mega"
MODEL_TYPES = ("mega", REMOTE_ONLY_MODEL_TYPE)   # the config.json model_types of this family


def hf_to_megatrain_state_dict(sd: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    return keymap.from_hf_state_dict(sd, task, FAMILY)


def megatrain_to_hf_state_dict(sd: dict[str, torch.Tensor], task: str, config: MegaConfig) -> dict[str, torch.Tensor]:
    rotary = config.relative_positional_bias == "rotary"  # its dummy buffer, one per layer
    return keymap.to_hf_state_dict(sd, task, FAMILY, dummy_layers=config.num_hidden_layers if rotary else 0)


def task_of(model) -> Optional[str]:
    """The task of a megatrain MEGA model (None: not one of this family's classes)."""
    return next((task for task, cls in _CLASSES.items() if isinstance(model, cls)), None)


def config_from_hf_dict(d: dict, where: str = "config.json") -> MegaConfig:
    """MegaConfig from a config.json dict: HF-generic keys ignored; an rmsnorm checkpoint without megatrain's
    hf_rmsnorm_noop is transformers' (its norm only multiplies by the weight, see the module docstring)."""
    d = {k: v for k, v in d.items() if k not in _HF_ONLY_FIELDS}
    if d.get("model_type") == REMOTE_ONLY_MODEL_TYPE:
        d["model_type"] = "mega"
    if d.get("normalization_type") == "rmsnorm" and "hf_rmsnorm_noop" not in d:
        d["hf_rmsnorm_noop"] = True
    try:
        return MegaConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def task_of_config(d: dict, where: str = "config.json") -> str:
    """The task a config.json describes: from `architectures`, else from is_decoder (causal or masked)."""
    archs = d.get("architectures") or []
    found = [t for t, a in ARCHS.items() if a in archs]
    if len(found) > 1:
        raise ValueError(f"{where}: architectures={archs} is ambiguous; pass task= one of {found}")
    if found:
        return found[0]
    return "causal" if d.get("is_decoder") else "masked"


def check_task(task: str, config: MegaConfig, where: str) -> None:
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    if task == "causal" and not config.is_decoder:
        raise ValueError(f"{where}: a causal LM needs is_decoder=true (got false); "
                         "fix config.json or load with task='masked'")
    if task == "masked" and config.is_decoder:
        raise ValueError(f"{where}: is_decoder=true but task is 'masked'; load with task='causal'")


def num_labels_of(d: dict) -> int:
    """transformers' label count: len(id2label), 2 when the config names none."""
    return len(d["id2label"]) if d.get("id2label") else int(d.get("num_labels", 2))


def build_for_task(task: str, config: MegaConfig, hf_dict: Optional[dict] = None, add_pooling_layer: bool = True):
    """The megatrain model of `task` for `config` (heads get their label count/problem type from hf_dict; the
    bare backbone its pooler if add_pooling_layer)."""
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    cls = _CLASSES[task]
    if task in LM_TASKS:
        return cls(config)
    if task == "backbone":
        return cls(config, add_pooling_layer=add_pooling_layer)
    d = hf_dict or {}
    kw = {"problem_type": d.get("problem_type")} if task == "sequence-classification" else {}
    return cls(config, num_labels=num_labels_of(d), **kw)


def native_problem(config: MegaConfig) -> Optional[str]:
    """Why transformers 4.57's own MEGA would compute something else for this config (None: it computes the same).
    Such configs are exported for the remote code only (model_type REMOTE_ONLY_MODEL_TYPE)."""
    if config.normalization_type == "rmsnorm" and not config.hf_rmsnorm_noop:
        return ("normalization_type='rmsnorm' normalizes in megatrain but transformers' MegaRMSNorm does not "
                "(it only multiplies by the weight)")
    if config.is_decoder and config.truncation is not None:
        return (f"truncation={config.truncation} in a causal model: transformers' default cached forward "
                "ignores it")
    return None


def hf_config_dict(config: MegaConfig, task: str, model=None) -> dict:
    """config.json of a `task` model (native_problem(config) set: model_type REMOTE_ONLY_MODEL_TYPE)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _MEGATRAIN_ONLY_FIELDS}
    if config.normalization_type == "rmsnorm":
        d["hf_rmsnorm_noop"] = config.hf_rmsnorm_noop  # which rmsnorm (see config_from_hf_dict)
    d.update(model_type=REMOTE_ONLY_MODEL_TYPE if native_problem(config) else "mega", architectures=[ARCHS[task]],
             num_attention_heads=1)
    if task not in LM_TASKS + ("backbone",) and model is not None:
        d["id2label"] = getattr(model, "id2label", None) or {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        if getattr(model, "problem_type", None):
            d["problem_type"] = model.problem_type
    return d
