# Copyright 2026 The megatrain authors. (transformers' model tests read a model file's year from this line.)
"""MegaConfig for transformers (remote code): every field of megatrain's MegaConfig, with its default.

    config = AutoConfig.from_pretrained("hf_dir", trust_remote_code=True)    # this class, from the export's auto_map
    config.to_megatrain()                                                   # megatrain.model.MegaConfig

`MegatrainMegaConfig` (model_type "megatrain_mega") is the same class for exports that transformers' own MEGA
would compute differently (see megatrain.hf.format.py native_problem): no native class exists for that type,
so a folder saved from it never loads natively by mistake.
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from megatrain.hf.mega import config_from_hf_dict
from megatrain.model.mega.config import KNOB
from megatrain.model.mega.config import MegaConfig as _MT

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_MT)}
# megatrain's run knobs (speed/memory only) are not part of an exported model
_NOT_EXPORTED = _MT.megatrain_only_fields(KNOB)


class MegaConfig(PretrainedConfig):
    model_type = "mega"

    def __init__(self, **kwargs):
        values = {k: kwargs.pop(k, v) for k, v in _DEFAULTS.items() if k not in _NOT_EXPORTED}
        if "hf_rmsnorm_noop" not in kwargs and values["normalization_type"] == "rmsnorm":
            # a config without the flag is transformers' (its rmsnorm only multiplies by the weight)
            values["hf_rmsnorm_noop"] = True
        ids = {k: values[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
        super().__init__(**ids, **kwargs)
        for k, v in values.items():  # set after the base class, which may default some of them itself
            setattr(self, k, v)
        # transformers' MegaConfig carries this dummy (MEGA has one attention head); generic code reads it
        self.num_attention_heads = kwargs.get("num_attention_heads", 1)

    def to_megatrain(self) -> _MT:
        d = {k: getattr(self, k) for k in _DEFAULTS if k not in _NOT_EXPORTED and hasattr(self, k)}
        return config_from_hf_dict(d, f"{type(self).__name__}")


class MegatrainMegaConfig(MegaConfig):
    model_type = "megatrain_mega"


# config.json model_type -> this module's class for it (megatrain/hf/remote_code.py writes auto_map from it)
CONFIG_CLASSES = {"mega": "MegaConfig", "megatrain_mega": "MegatrainMegaConfig"}
