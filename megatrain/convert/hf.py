"""Hugging Face transformers <-> megatrain for MEGA checkpoints (transformers 4.57.x `MegaForCausalLM/MaskedLM`).

Use:
    from megatrain.convert.hf import load_hf, save_hf
    model = load_hf("hf_dir")                 # config.json + model.safetensors (or pytorch_model.bin); eval mode
    model = load_hf("hf_dir", task="causal")  # override the CausalLM/MaskedLM choice ("causal" | "masked")
    save_hf(model, "out_dir")                 # loads with transformers.AutoModelFor{CausalLM,MaskedLM}

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

from megatrain.model.config import MegaConfig
from megatrain.model.mega import MegaForCausalLM, MegaForMaskedLM

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
]
# transformers' rotary bias registers a persistent dummy buffer (used only for its device/dtype): dropped on load,
# written as 0.0 on save so from_pretrained reports no missing keys.
_HF_DUMMY_BUFFER = "mega.layers.{i}.mega_layer.rel_pos_bias._float_tensor"

_ARCHS = {"causal": "MegaForCausalLM", "masked": "MegaForMaskedLM"}
_CLASSES = {"causal": MegaForCausalLM, "masked": MegaForMaskedLM}
_HEADS = {"causal": "lm_head", "masked": "mlm_head"}
_MEGATRAIN_ONLY_FIELDS = ("gradient_checkpointing", "hf_rmsnorm_noop", "ema_block_size", "kernel_backend",
                          "segment_size")


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{leaf\}", r"(?P<leaf>[A-Za-z_][\w.]*)")
    return re.compile(rx + r"\Z")


def _rename(key: str, task: str, to_hf: bool) -> str:
    for ours, theirs in KEY_TABLE:
        theirs = theirs.replace("{head}", _HEADS[task])
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        m = _compile(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    side = "megatrain" if to_hf else "transformers"
    raise ValueError(f"no key-map rule for {side} key {key!r}")


def hf_to_megatrain_state_dict(sd: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    dummy = _compile(_HF_DUMMY_BUFFER)
    return {_rename(k, task, to_hf=False): v for k, v in sd.items() if not dummy.match(k)}


def megatrain_to_hf_state_dict(sd: dict[str, torch.Tensor], task: str, config: MegaConfig) -> dict[str, torch.Tensor]:
    out = {_rename(k, task, to_hf=True): v for k, v in sd.items()}
    if config.relative_positional_bias == "rotary":
        for i in range(config.num_hidden_layers):
            out[_HF_DUMMY_BUFFER.format(i=i)] = torch.zeros(1)
    return out


def _task_of(model) -> str:
    for task, cls in _CLASSES.items():
        if isinstance(model, cls):
            return task
    raise ValueError(f"save_hf needs a MegaForCausalLM or MegaForMaskedLM, got {type(model).__name__}")


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


def load_hf(path: Union[str, os.PathLike], task: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Union[MegaForCausalLM, MegaForMaskedLM]:
    """Load a transformers MEGA folder as a megatrain model (eval mode).

    task: None = from `architectures` (MegaForCausalLM / MegaForMaskedLM), else from `is_decoder`;
          "causal" / "masked" overrides.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path}: no config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    if task is None:
        archs = d.get("architectures") or []
        found = [t for t, a in _ARCHS.items() if a in archs]
        if len(found) > 1:
            raise ValueError(f"{cfg_path}: architectures={archs} is ambiguous; pass task='causal' or 'masked'")
        task = found[0] if found else ("causal" if d.get("is_decoder") else "masked")
    if task not in _CLASSES:
        raise ValueError(f"task={task!r}: expected 'causal' or 'masked'")
    if d.get("normalization_type") == "rmsnorm":
        d["hf_rmsnorm_noop"] = True  # what transformers computes (see module docstring)
    try:
        config = MegaConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    if task == "causal" and not config.is_decoder:
        raise ValueError(f"{cfg_path}: a causal LM needs is_decoder=true (got false); "
                         "fix config.json or load with task='masked'")
    if task == "masked" and config.is_decoder:
        raise ValueError(f"{cfg_path}: is_decoder=true but task is 'masked'; load with task='causal'")
    model = _CLASSES[task](config)
    sd = hf_to_megatrain_state_dict(_read_state_dict(path), task)
    emb = "mega.embeddings.word_embeddings.weight"
    if config.tie_word_embeddings and emb in sd:
        # transformers re-ties after loading: the input embedding is the output weight
        sd["lm_head.weight"] = sd[emb]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"{path}: weights do not match the config ({what}; "
                         f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def hf_config_dict(config: MegaConfig, task: str) -> dict:
    d = {k: v for k, v in config.to_dict().items() if k not in _MEGATRAIN_ONLY_FIELDS}
    d.update(model_type="mega", architectures=[_ARCHS[task]], num_attention_heads=1)
    return d


def save_hf(model, out_dir: Union[str, os.PathLike]) -> str:
    """Write config.json + model.safetensors that transformers 4.57.x loads with the same logits. Returns out_dir."""
    from safetensors.torch import save_file

    task = _task_of(model)
    config: MegaConfig = model.config
    if config.normalization_type == "rmsnorm" and not config.hf_rmsnorm_noop:
        raise ValueError(
            "save_hf: normalization_type='rmsnorm' normalizes in megatrain but transformers' MegaRMSNorm does not "
            "(it only multiplies by the weight), so a native HF export would compute something else; "
            "refusing (use another norm, or the remote-code export)"
        )
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        # tied: transformers re-creates the head weight from the embedding; safetensors refuses shared storage
        sd.pop("lm_head.weight")
    hf_sd = megatrain_to_hf_state_dict(sd, task, config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, task), f, indent=2, sort_keys=True)
    save_file(hf_sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
