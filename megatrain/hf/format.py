"""The transformers format of megatrain models, every family: load_hf / save_hf (folders), the checks around them.

Use:
    from megatrain.hf import load_hf, save_hf
    model = load_hf("hf_dir")                 # config.json + model.safetensors (or pytorch_model.bin); eval mode
    model = load_hf("hf_dir", task="causal")  # override the head chosen from `architectures`
    save_hf(model, "out_dir")                 # loads with transformers' AutoModelFor<task> (native 4.57 MEGA classes)
Tests: PYTHONPATH=. python -m pytest -q tests/hf

The family of a folder is its config.json's model_type (FORMATS): MEGA (megatrain/hf/mega.py: transformers 4.57's
MEGA, every head; its own folders and megatrain's exports) and Megalodon (megatrain/hf/megalodon.py: megatrain's
export is its only transformers format). Each family module answers the same questions (config.json <-> config,
tasks, the state dict under the one key map, megatrain/hf/keymap.py); this file reads and writes the folders.

save_hf writes a *native* folder by default: one transformers' own classes load (MEGA in 4.57.x) with the same
logits; it refuses a model they would compute differently or have no class for (the family's native_problem:
a real RMSNorm, a truncated causal MEGA, any Megalodon). native=False (the remote-code export,
megatrain/hf/remote_code.py) writes the folder anyway, for the remote code to load.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from megatrain.hf import mega, megalodon
from megatrain.hf.keymap import KEY_MAPS
from megatrain.hf.mega import (KEY_TABLE, REMOTE_ONLY_MODEL_TYPE, hf_to_megatrain_state_dict,  # noqa: F401
                               megatrain_to_hf_state_dict, native_problem)

# family -> its side of the format (the module's functions: config_from_hf_dict, task_of_config, check_task,
# build_for_task, task_of, native_problem, hf_config_dict, hf_to_megatrain_state_dict, megatrain_to_hf_state_dict)
FORMATS = {"mega": mega, "megalodon": megalodon}


def family_of_hf_dict(d: dict, where: str = "config.json") -> str:
    """The family of a config.json: its model_type (none: MEGA, as transformers' own MEGA configs always say)."""
    model_type = d.get("model_type", "mega")
    for family, fmt in FORMATS.items():
        if model_type in fmt.MODEL_TYPES:
            return family
    known = [t for fmt in FORMATS.values() for t in fmt.MODEL_TYPES]
    raise ValueError(f"{where}: model_type={model_type!r} is no megatrain model family (expected one of {known})")


def format_of(model):
    """(the family's format module, the model's task) of a megatrain model."""
    for fmt in FORMATS.values():
        task = fmt.task_of(model)
        if task is not None:
            return fmt, task
    archs = sorted(a for fmt in FORMATS.values() for a in fmt.ARCHS.values())
    raise ValueError(f"save_hf needs a megatrain model of one of {archs}, got {type(model).__name__}")


def _task_of(model) -> str:
    return format_of(model)[1]


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


def read_hf_config(path: Union[str, os.PathLike]):
    """(the model config, the raw config.json dict) of a transformers folder of any family (native MEGA 4.57 or
    megatrain's export)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    return FORMATS[family_of_hf_dict(d, cfg_path)].config_from_hf_dict(d, cfg_path), d


def task_of_config(d: dict, where: str = "config.json") -> str:
    """The task a config.json describes (its family's rule)."""
    return FORMATS[family_of_hf_dict(d, where)].task_of_config(d, where)


def load_hf(path: Union[str, os.PathLike], task: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """Load a transformers folder of any family as a megatrain model (eval mode).

    task: None = from `architectures` (MEGA: any of the six transformers MEGA heads, or the bare MegaModel:
          "backbone", a MegaModelWithPooler; else from `is_decoder`, causal or masked. Megalodon: causal or
          backbone); one of the family's TASKS overrides.
    """
    path = os.fspath(path)
    config, d = read_hf_config(path)
    cfg_path = os.path.join(path, "config.json")
    fmt = FORMATS[family_of_hf_dict(d, cfg_path)]
    if task is None:
        task = fmt.task_of_config(d, cfg_path)
    fmt.check_task(task, config, cfg_path)
    sd = fmt.hf_to_megatrain_state_dict(_read_state_dict(path), task)
    # a bare MegaModel has a pooler when transformers built it with add_pooling_layer (AutoModel's default)
    model = fmt.build_for_task(task, config, d, add_pooling_layer=any(k.startswith("pooler.") for k in sd))
    load_checked(model, sd, path)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_checked(model, sd: dict[str, torch.Tensor], where: str) -> None:
    """model.load_state_dict(sd) (megatrain names) after checking names and shapes: one clear error if not."""
    emb = KEY_MAPS[model.config.model_type].embedding
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


def save_hf(model, out_dir: Union[str, os.PathLike], native: bool = True) -> str:
    """Write config.json + model.safetensors of a megatrain model (any family). Returns out_dir.

    native=True: a folder transformers' own classes load with the same logits (MEGA in 4.57.x), else a one-line
    ValueError saying why not (the family's native_problem). native=False (the remote-code export,
    megatrain/hf/remote_code.py): written anyway (MEGA: model_type REMOTE_ONLY_MODEL_TYPE where native MEGA would
    compute something else)."""
    from safetensors.torch import save_file

    fmt, task = format_of(model)
    config = model.config
    why = fmt.native_problem(config)
    if why and native:
        raise ValueError(f"save_hf: {why}, so a native transformers folder would not compute this model; "
                         "refusing (use the remote-code export: launch/export_hf.py)")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        # tied: transformers re-creates the head weight from the embedding; safetensors refuses shared storage
        sd.pop("lm_head.weight")
    hf_sd = fmt.megatrain_to_hf_state_dict(sd, task, config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(fmt.hf_config_dict(config, task, model), f, indent=2, sort_keys=True)
    save_file(hf_sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
