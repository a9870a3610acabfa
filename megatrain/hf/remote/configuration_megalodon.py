# Copyright 2026 The megatrain authors. (transformers' model tests read a model file's year from this line.)
"""MegalodonConfig for transformers (remote code): every field of megatrain's MegalodonConfig but its run knobs,
with its default.

    config = AutoConfig.from_pretrained("hf_dir", trust_remote_code=True)    # this class, from the export's auto_map
    config.to_megatrain()                                                   # megatrain.model.MegalodonConfig

model_type "megalodon": transformers has no class of that type, so only trust_remote_code=True loads a folder.
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from megatrain.hf.megalodon import config_from_hf_dict
from megatrain.model.megalodon.config import KNOBS
from megatrain.model.megalodon.config import MegalodonConfig as _MT

# the exported fields (megatrain's run knobs -- speed/memory only -- are not part of an exported model)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_MT) if f.name not in KNOBS and f.name != "model_type"}


class MegalodonConfig(PretrainedConfig):
    model_type = "megalodon"

    def __init__(self, **kwargs):
        values = {k: kwargs.pop(k, v) for k, v in _DEFAULTS.items()}
        ids = {k: values[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
        super().__init__(**ids, **kwargs)
        for k, v in values.items():  # set after the base class, which may default some of them itself
            setattr(self, k, v)

    def to_megatrain(self) -> _MT:
        return config_from_hf_dict({k: getattr(self, k) for k in _DEFAULTS}, type(self).__name__)


# config.json model_type -> this module's class for it (megatrain/hf/remote_code.py writes auto_map from it)
CONFIG_CLASSES = {"megalodon": "MegalodonConfig"}
