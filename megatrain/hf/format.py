"""The transformers format of MEGA checkpoints <-> megatrain models (transformers 4.57.x MEGA, every head).

Use:
    from megatrain.hf import load_hf, save_hf
    model = load_hf("hf_dir")                 # config.json + model.safetensors (or pytorch_model.bin); eval mode
    model = load_hf("hf_dir", task="causal")  # override the head chosen from `architectures` (TASKS below)
    save_hf(model, "out_dir")                 # loads with transformers' AutoModelFor<task> (native 4.57 classes)

Tasks (megatrain class <- transformers architecture): causal (MegaForCausalLM), masked (MegaForMaskedLM),
sequence-classification, token-classification, question-answering, multiple-choice (megatrain/model/heads.py;
the label count is len(id2label) of config.json, problem_type is kept).

The module trees differ; `KEY_TABLE` is the one renaming table, read left-to-right by save_hf and right-to-left by
load_hf. Rules are tried in order, the first whole-key match wins.

rmsnorm: transformers' MegaRMSNorm computes x * weight (its normalization result is discarded). load_hf keeps
that behaviour for HF rmsnorm checkpoints (config.hf_rmsnorm_noop=True), so logits stay what they were in
transformers; save_hf refuses a model with a real RMSNorm (hf_rmsnorm_noop=False), because the native HF class
would silently compute something else.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Union

import torch

from megatrain.model.mega.config import MegaConfig
from megatrain.model.mega.heads import (MegaForMultipleChoice, MegaForQuestionAnswering, MegaForSequenceClassification,
                                   MegaForTokenClassification, MegaModelWithPooler)
from megatrain.model.mega.lm import MegaForCausalLM, MegaForMaskedLM

# (megatrain key, transformers key). {i} = layer index, {leaf} = the rest of the key, {head} = lm_head | mlm_head.
KEY_TABLE: list[tuple[str, str]] = [
    ("mega.embeddings.word_embeddings.weight", "mega.embedding_layer.word_embeddings.weight"),
    ("mega.embeddings.token_type_embeddings.weight", "mega.embedding_layer.token_type_embeddings.weight"),
    ("mega.layers.{i}.attn.norm.{leaf}", "mega.layers.{i}.mega_layer.norm.norm.{leaf}"),
    ("mega.layers.{i}.attn.ema.{leaf}", "mega.layers.{i}.mega_layer.ema_gate.{leaf}"),
    ("mega.layers.{i}.attn.rel_pos.alpha", "mega.layers.{i}.mega_layer.rel_pos_bias.alpha"),
    ("mega.layers.{i}.attn.rel_pos.beta", "mega.layers.{i}.mega_layer.rel_pos_bias.b_param"),
    ("mega.layers.{i}.attn.rel_pos.weight", "mega.layers.{i}.mega_layer.rel_pos_bias.rel_pos_bias"),
    ("mega.layers.{i}.attn.{leaf}", "mega.layers.{i}.mega_layer.{leaf}"),
    ("mega.layers.{i}.ffn.norm.{leaf}", "mega.layers.{i}.nffn.norm.norm.{leaf}"),
    ("mega.layers.{i}.ffn.{leaf}", "mega.layers.{i}.nffn.{leaf}"),
    ("dense.{leaf}", "dense.{leaf}"),
    ("lm_head.{leaf}", "{head}.{leaf}"),
    # the downstream heads (megatrain/model/heads.py): same module names, except the pooler of multiple choice,
    # which transformers keeps inside its backbone
    ("classifier.{leaf}", "classifier.{leaf}"),
    ("qa_outputs.{leaf}", "qa_outputs.{leaf}"),
    ("pooler.{leaf}", "mega.pooler.{leaf}"),
]
# transformers' rotary bias registers a persistent dummy buffer (used only for its device/dtype): dropped on load,
# written as 0.0 on save so from_pretrained reports no missing keys.
_HF_DUMMY_BUFFER = "mega.layers.{i}.mega_layer.rel_pos_bias._float_tensor"

_CLASSES = {"causal": MegaForCausalLM, "masked": MegaForMaskedLM,
            "sequence-classification": MegaForSequenceClassification,
            "token-classification": MegaForTokenClassification,
            "question-answering": MegaForQuestionAnswering, "multiple-choice": MegaForMultipleChoice,
            "backbone": MegaModelWithPooler}
TASKS = tuple(_CLASSES)
# transformers' class names are megatrain's (the bare backbone: transformers' MegaModel)
_ARCHS = {task: "MegaModel" if task == "backbone" else cls.__name__ for task, cls in _CLASSES.items()}
_HEADS = {"causal": "lm_head", "masked": "mlm_head"}  # the vocabulary head's name on the HF side
_LM_TASKS = ("causal", "masked")
# not in transformers' config: not written to config.json (hf_rmsnorm_noop: only where it applies)
_MEGATRAIN_ONLY_FIELDS = MegaConfig.megatrain_only_fields()
# config.json keys of the classification heads (label names, problem type): the model class reads them
_HF_ONLY_FIELDS = ("id2label", "label2id", "num_labels", "problem_type")
# model_type of an export that transformers' own MEGA would compute differently (native_problem): no native
# class is registered for it, so only trust_remote_code=True loads it
REMOTE_ONLY_MODEL_TYPE = "megatrain_mega"


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{leaf\}", r"(?P<leaf>[A-Za-z_][\w.]*)")
    return re.compile(rx + r"\Z")


def _rename(key: str, task: str, to_hf: bool) -> str:
    if task == "backbone":
        # transformers' bare MegaModel is the LMs' "mega." subtree at the root (its pooler included): the same table
        return (_rename(key, "masked", True).removeprefix("mega.") if to_hf
                else _rename("mega." + key, "masked", False))
    for ours, theirs in KEY_TABLE:
        if "{head}" in theirs:
            if task not in _HEADS:
                continue
            theirs = theirs.replace("{head}", _HEADS[task])
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        m = _compile(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    side = "megatrain" if to_hf else "transformers"
    raise ValueError(f"no key-map rule for {side} key {key!r}")


def to_hf_key(key: str, task: str) -> str:
    """transformers' name of the megatrain parameter/buffer `key` of a `task` model (the remote code uses it)."""
    return _rename(key, task, to_hf=True)


def hf_to_megatrain_state_dict(sd: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    dummy = _compile(_HF_DUMMY_BUFFER)
    return {_rename(k, task, to_hf=False): v for k, v in sd.items()
            if not dummy.match("mega." + k if task == "backbone" else k)}


def megatrain_to_hf_state_dict(sd: dict[str, torch.Tensor], task: str, config: MegaConfig) -> dict[str, torch.Tensor]:
    out = {_rename(k, task, to_hf=True): v for k, v in sd.items()}
    if config.relative_positional_bias == "rotary":
        for i in range(config.num_hidden_layers):
            key = _HF_DUMMY_BUFFER.format(i=i)
            out[key.removeprefix("mega.") if task == "backbone" else key] = torch.zeros(1)
    return out


def _task_of(model) -> str:
    for task, cls in _CLASSES.items():
        if isinstance(model, cls):
            return task
    raise ValueError(f"save_hf needs one of {sorted(_ARCHS.values())}, got {type(model).__name__}")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "model.safetensors")
    bin_ = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.exists(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    if any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors.index.json",
                                                             "pytorch_model.bin.index.json")):
        raise ValueError(f"{path}: sharded checkpoints are not supported (merge the shards first)")
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")


def read_hf_config(path: Union[str, os.PathLike]) -> tuple[MegaConfig, dict]:
    """(MegaConfig, the raw config.json dict) of a transformers MEGA folder (native 4.57 or megatrain's export)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    return config_from_hf_dict(d, cfg_path), d


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
    found = [t for t, a in _ARCHS.items() if a in archs]
    if len(found) > 1:
        raise ValueError(f"{where}: architectures={archs} is ambiguous; pass task= one of {found}")
    if found:
        return found[0]
    return "causal" if d.get("is_decoder") else "masked"


def num_labels_of(d: dict) -> int:
    """transformers' label count: len(id2label), 2 when the config names none."""
    return len(d["id2label"]) if d.get("id2label") else int(d.get("num_labels", 2))


def build_for_task(task: str, config: MegaConfig, hf_dict: Optional[dict] = None, add_pooling_layer: bool = True):
    """The megatrain model of `task` for `config` (heads get their label count/problem type from hf_dict; the
    bare backbone its pooler if add_pooling_layer)."""
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    cls = _CLASSES[task]
    if task in _LM_TASKS:
        return cls(config)
    if task == "backbone":
        return cls(config, add_pooling_layer=add_pooling_layer)
    d = hf_dict or {}
    kw = {"problem_type": d.get("problem_type")} if task == "sequence-classification" else {}
    return cls(config, num_labels=num_labels_of(d), **kw)


def load_hf(path: Union[str, os.PathLike], task: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """Load a transformers MEGA folder as a megatrain model (eval mode).

    task: None = from `architectures` (any of the six transformers MEGA heads, or the bare MegaModel:
          "backbone", a MegaModelWithPooler), else from `is_decoder` (causal or masked); one of TASKS overrides.
    """
    path = os.fspath(path)
    config, d = read_hf_config(path)
    cfg_path = os.path.join(path, "config.json")
    if task is None:
        task = task_of_config(d, cfg_path)
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    if task == "causal" and not config.is_decoder:
        raise ValueError(f"{cfg_path}: a causal LM needs is_decoder=true (got false); "
                         "fix config.json or load with task='masked'")
    if task == "masked" and config.is_decoder:
        raise ValueError(f"{cfg_path}: is_decoder=true but task is 'masked'; load with task='causal'")
    sd = hf_to_megatrain_state_dict(_read_state_dict(path), task)
    # a bare MegaModel has a pooler when transformers built it with add_pooling_layer (AutoModel's default)
    model = build_for_task(task, config, d, add_pooling_layer=any(k.startswith("pooler.") for k in sd))
    load_checked(model, sd, path)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_checked(model, sd: dict[str, torch.Tensor], where: str) -> None:
    """model.load_state_dict(sd) (megatrain names) after checking names and shapes: one clear error if not."""
    emb = "mega.embeddings.word_embeddings.weight"
    if getattr(model, "lm_head", None) is not None and model.config.tie_word_embeddings and emb in sd:
        # transformers re-ties after loading: the input embedding is the output weight
        sd["lm_head.weight"] = sd[emb]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"{where}: weights do not match the config ({what}; "
                         f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)


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
    d = {k: v for k, v in config.to_dict().items() if k not in _MEGATRAIN_ONLY_FIELDS}
    if config.normalization_type == "rmsnorm":
        d["hf_rmsnorm_noop"] = config.hf_rmsnorm_noop  # which rmsnorm (see config_from_hf_dict)
    d.update(model_type="mega", architectures=[_ARCHS[task]], num_attention_heads=1)
    if task not in _LM_TASKS + ("backbone",) and model is not None:
        d["id2label"] = getattr(model, "id2label", None) or {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        if getattr(model, "problem_type", None):
            d["problem_type"] = model.problem_type
    return d


def save_hf(model, out_dir: Union[str, os.PathLike], native: bool = True) -> str:
    """Write config.json + model.safetensors that transformers 4.57.x loads with the same logits. Returns out_dir.

    native=False (the remote-code export, megatrain/hf/remote_code.py): a config transformers would
    compute differently is written with model_type REMOTE_ONLY_MODEL_TYPE instead of refused."""
    from safetensors.torch import save_file

    task = _task_of(model)
    config: MegaConfig = model.config
    why = native_problem(config)
    if why and native:
        raise ValueError(f"save_hf: {why}, so a native HF export would compute something else; "
                         "refusing (use the remote-code export: launch/export_hf.py)")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        # tied: transformers re-creates the head weight from the embedding; safetensors refuses shared storage
        sd.pop("lm_head.weight")
    hf_sd = megatrain_to_hf_state_dict(sd, task, config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    d = hf_config_dict(config, task, model)
    if why:
        d["model_type"] = REMOTE_ONLY_MODEL_TYPE
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file(hf_sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
