"""transformers PreTrainedModel classes around megatrain's Megalodon (remote code; 4.57.x and 5.x): the first
transformers implementation of Megalodon (Ma et al. 2024, arXiv 2404.08801).

    model = AutoModelForCausalLM.from_pretrained("hf_dir", trust_remote_code=True)
    ids = model.generate(input_ids, max_new_tokens=20)   # greedy == megatrain.generate; sampling, num_beams work too
    out = model(input_ids, labels=input_ids, output_hidden_states=True, output_attentions=True)
    AutoModel (MegalodonModel: last_hidden_state after the final timestep norm): the same folder.
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_megalodon_export.py

The mechanics are every family's (megatrain/hf/remote/wrapper.py): megatrain's model registered under the names
of the one key map (for Megalodon megatrain's own names, megatrain/hf/keymap.py: `megalodon.layers.i` is
megatrain's MegalodonBlock itself, made a GradientCheckpointingLayer), synced before every forward, observed by
hooks. What is Megalodon's here:
- hidden states: each layer's input (the embeddings' output first), then the final timestep norm's output (= the
  last hidden state), as transformers' pre-norm decoders report them;
- attentions: per layer [B, chunks * heads, chunk, chunk] (one chunk: [B, heads, L, L]), the probabilities of
  the one attention op (megatrain.ops.attention.chunk_attention, run again on an identity value matrix; before
  attention dropout), chunk-major; under autograd the layer's output is computed from them;
- generation: past_key_values is megatrain's MegalodonCache (per layer: timestep-norm statistics, complex EMA
  state, the current chunk's rotated keys and values; the final norm's statistics);
- initialisation of missing weights: megatrain's own (model/megalodon: init_mode for the linear layers, the
  embedding's truncated normal, norms at their "+1" zero, the complex EMA's reset_parameters).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from megatrain.hf.keymap import KEY_MAPS, to_hf_key
from megatrain.hf.megalodon import FAMILY, MegalodonBackbone, build_for_task
from megatrain.hf.remote.configuration_megalodon import MegalodonConfig
from megatrain.hf.remote.wrapper import (BackboneObserver, CausalLMMixin, MegatrainPreTrainedModel, init_tensor,
                                         is_loaded, rehome, tied_keys)
from megatrain.model.lm import LMHead
from megatrain.model.megalodon.attention import MegalodonAttention
from megatrain.model.megalodon.backbone import MegalodonCache, MegalodonFFN, init_embedding_, init_weights_
from megatrain.model.megalodon.cema import ComplexEMA
from megatrain.model.megalodon.norms import OffsetLayerNorm, OffsetRMSNorm, TimestepNorm


class MegalodonPreTrainedModel(MegatrainPreTrainedModel):
    config_class = MegalodonConfig
    base_model_prefix = "megalodon"
    family = FAMILY
    task: str = "causal"
    _no_split_modules = ["MegalodonBlock"]

    def __init__(self, config: MegalodonConfig):
        super().__init__(config)
        self.build(config, build_for_task(self.task, config.to_megatrain()))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # megatrain's init (model/megalodon/backbone.py), module by module; in 5.x torch.nn.init is guarded around
        # this call (loaded tensors are kept); the complex EMA's init also copies, so it checks itself
        cfg = self.config
        if isinstance(module, LMHead):
            if module.weight is not self.get_input_embeddings().weight:  # tied: initialised as the embedding
                init_embedding_(module.weight, cfg.hidden_size)
        elif isinstance(module, nn.Linear):
            init_weights_(module, cfg)
        elif isinstance(module, nn.Embedding):
            init_embedding_(module.weight, cfg.hidden_size)
        elif isinstance(module, ComplexEMA):
            if not is_loaded(module):
                module.reset_parameters()
        elif isinstance(module, (TimestepNorm, OffsetRMSNorm, OffsetLayerNorm, MegalodonAttention)):
            for name in ("weight", "bias", "gamma", "beta"):  # the "+1" weights and offsets start at 0
                t = module._parameters.get(name)
                if t is not None:
                    init_tensor(t, "zeros_")
        elif isinstance(module, MegalodonFFN) and module.alpha is not None:
            index = next(i for i, layer in enumerate(self.backbone_model()._layers) if layer.ffn is module)
            init_tensor(module.alpha, "constant_", val=0.1 * 0.5 ** index)


class MegalodonModel(BackboneObserver, MegalodonPreTrainedModel):
    """The bare backbone: last_hidden_state [B, L, D] (after the final timestep norm). Inside the LM it is
    `.megalodon`, built around its megatrain backbone (`backbone`)."""

    task = "backbone"

    def __init__(self, config: MegalodonConfig, backbone: Optional[nn.Module] = None):
        PreTrainedModel.__init__(self, config)
        # around a given backbone its config object is the LM's: one config, shared by every megatrain module
        mt = MegalodonBackbone(backbone.config if backbone is not None else config.to_megatrain(), backbone=backbone)
        object.__setattr__(self, "_mt", mt)
        self._bindings = rehome(self, mt, self.to_hf_key)
        self.observe_backbone(mt.megalodon, mt.megalodon.embed)
        self.post_init()

    def hidden_state_points(self, backbone: nn.Module) -> list:
        return [(layer, "input") for layer in backbone.layers] + [(backbone.final_norm, "output")]

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value  # megatrain's tree follows at the next forward (sync)
        value.register_forward_hook(self._substitute)
        self._mt.config.vocab_size = value.num_embeddings  # megatrain checks ids against it (config is shared)

    def observe_attention(self, index: int, layer: nn.Module) -> None:
        attn = layer.attn
        inner = attn._attend

        def attend(q, k, v, **mask):
            if self._attn is None:
                return inner(q, k, v, **mask)
            # probs @ I = probs: the one attention op on an identity value matrix, without dropout (transformers
            # returns the probabilities before it); q [B, n, Tq, H, d], k [B, n, Tk, H, d]
            b, n, tq, h = q.shape[:4]
            tk = k.shape[2]
            eye = torch.eye(tk, dtype=v.dtype, device=v.device).view(1, 1, tk, 1, tk).expand(b, n, tk, h, tk)
            training, attn.training = attn.training, False
            try:
                probs = inner(q, k, eye, **mask)                                     # [B, n, Tq, H, Tk]
            finally:
                attn.training = training
            returned = probs.permute(0, 1, 3, 2, 4).reshape(b, n * h, tq, tk)    # [B, n * H, Tq, Tk]
            self._attn[index].append(returned)
            if not (torch.is_grad_enabled() and returned.requires_grad):
                return inner(q, k, v, **mask)  # the op itself: its numbers exactly
            # under autograd the output is computed from the very probabilities returned (retain_grad, losses on
            # attentions reach them): inner's computation written out, its attention dropout included
            p = attn.attention_dropout.p if attn.training else 0.0
            probs = returned.view(b, n, h, tq, tk)
            return torch.einsum("bnhqk,bnkhe->bnqhe", nn.functional.dropout(probs, p) if p else probs, v)

        attn._attend = attend  # an instance attribute: this model's attention modules only

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, token_type_ids=None, encoder_hidden_states=None,
                **kwargs):
        return self.backbone_forward(
            lambda ids: self._mt(ids, attention_mask, _token_types(token_type_ids)),
            lambda out, states, probs: BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state,
                                                               hidden_states=states, attentions=probs),
            input_ids, inputs_embeds, output_attentions, output_hidden_states, return_dict, encoder_hidden_states)


MegalodonPreTrainedModel.backbone_class = MegalodonModel


def _token_types(token_type_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for the all-zero token types tokenizers pass by default; any other Megalodon refuses (it has none)."""
    return None if token_type_ids is None or not bool(token_type_ids.any()) else token_type_ids


class MegalodonForCausalLM(CausalLMMixin, MegalodonPreTrainedModel, GenerationMixin):
    task = "causal"
    cache_class = MegalodonCache
    _tied_weights_keys = tied_keys("lm_head", to_hf_key(KEY_MAPS[FAMILY].embedding, "causal", FAMILY))

    def call_lm(self, mt, input_ids, attention_mask, token_type_ids, **kw):
        return mt(input_ids, attention_mask, _token_types(token_type_ids), **kw)


# auto_map of an export: Auto class -> class name in this module
AUTO_CLASSES = {
    "AutoModel": "MegalodonModel",
    "AutoModelForCausalLM": "MegalodonForCausalLM",
}
