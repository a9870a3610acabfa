"""A training checkpoint as a plain model: no DeepSpeed engine, no process group (export, evaluation, import).

    from megatrain.export.load import load_model
    model, cfg = load_model("runs/x/checkpoints")       # or one tag folder, e.g. runs/x/checkpoints/step00000040
"""
from __future__ import annotations

import os

import torch

from megatrain.config import load_config
from megatrain.hf.format import load_checked
from megatrain.model import build_model
from megatrain.train.checkpoint import LATEST, read_latest


def load_model(path: str):
    """(model in eval mode on CPU, fp32; its run Config) from a checkpoint directory (uses its ``latest``) or a
    tag directory. Needs no process group: ZeRO shards are merged with DeepSpeed's zero_to_fp32 (fp32 master
    weights, so bf16 runs export their exact master copy)."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, LATEST)):
        path = os.path.join(path, read_latest(path))
    cfg_file = os.path.join(path, "config.yaml")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} is not a megatrain checkpoint (no config.yaml)")
    cfg = load_config(cfg_file)
    if cfg.parallel.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    else:
        sd = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    model = build_model(cfg.model)
    load_checked(model, {k: v.float() for k, v in sd.items()}, path)
    return model.eval(), cfg
