"""The Megalodon language model: Megalodon's backbone + the shared vocabulary head and loss (causal only).

Use:
    from megatrain.model import MegalodonConfig, MegalodonForCausalLM, build_model
    model = build_model(MegalodonConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=16,
                                        norm_num_groups=4, shared_representation_size=32, intermediate_size=64,
                                        nffn_hidden_size=128))
    out = model(input_ids, labels=input_ids)          # the forward contract: megatrain/model/lm.py
    ids = megatrain.generate(model, input_ids, max_new_tokens=20)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

The head has no bias (the reference's output layer); tie_word_embeddings shares the embedding (share_emb).
"""
from __future__ import annotations

from torch import nn

from megatrain.model.lm import LanguageModel, LMHead
from megatrain.model.megalodon.backbone import MegalodonCache, MegalodonModel, init_embedding_
from megatrain.model.megalodon.config import MegalodonConfig


class MegalodonForCausalLM(LanguageModel):
    causal = True

    def __init__(self, config: MegalodonConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.megalodon = MegalodonModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.kernel_backend, bias=False)
        init_embedding_(self.lm_head.weight, config.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.megalodon.embed.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.megalodon.embed

    def new_cache(self) -> MegalodonCache:
        return self.megalodon.new_cache()

    def backbone_forward(self, input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache, final):
        return self.megalodon(input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache, final=final)


def build_megalodon(config: MegalodonConfig) -> MegalodonForCausalLM:
    return MegalodonForCausalLM(config)
