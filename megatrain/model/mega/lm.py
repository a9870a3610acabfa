"""The MEGA language models: MEGA's backbone + dense/tanh + the shared vocabulary head and loss, causal or masked.

Use:
    from megatrain.model import MegaConfig, MegaForCausalLM, build_model
    model = MegaForCausalLM(MegaConfig(vocab_size=256, hidden_size=64, is_decoder=True, bidirectional=False,
                                       use_chunking=True, chunk_size=128))
    out = model(input_ids, labels=input_ids)          # the forward contract: megatrain/model/lm.py
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_mega.py
The backbone (embeddings + layers): megatrain/model/mega/backbone.py; the downstream heads: mega/heads.py.
"""
from __future__ import annotations

import torch
from torch import nn

from megatrain.model.lm import LanguageModel, LMHead
from megatrain.model.mega.backbone import MegaCache, MegaModel, init_weights_
from megatrain.model.mega.config import MegaConfig


class _MegaLM(LanguageModel):
    """Shared by the causal and masked LM: backbone, optional dense+tanh, vocabulary head (tied or not), loss."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        if config.is_decoder != self.causal:
            raise ValueError(f"{type(self).__name__} needs config.is_decoder={self.causal}")
        self.config = config
        self.mega = MegaModel(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if config.add_lm_hidden_dense_layer else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.kernel_backend)
        self.init_weights()

    def init_weights(self) -> None:
        init_weights_(self, self.config)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.mega.embeddings.word_embeddings.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mega.embeddings.word_embeddings

    def new_cache(self) -> MegaCache:
        return self.mega.new_cache()

    @property
    def has_pre_head(self) -> bool:
        return self.dense is not None

    def pre_head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's dense + tanh (add_lm_hidden_dense_layer)."""
        return torch.tanh(self.dense(h))

    def backbone_forward(self, input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache, final):
        return self.mega(input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache, final=final)


class MegaForCausalLM(_MegaLM):
    causal = True


class MegaForMaskedLM(_MegaLM):
    causal = False


def build_mega(config: MegaConfig) -> _MegaLM:
    """MEGA's language model of a run: causal if ``config.is_decoder``, else masked. (In a run config the objective
    decides ``is_decoder``: see megatrain/config.py.)"""
    return (MegaForCausalLM if config.is_decoder else MegaForMaskedLM)(config)
