"""transformers PreTrainedModel classes around megatrain's MEGA (remote code; 4.57.x and 5.x).

    model = AutoModelForCausalLM.from_pretrained("hf_dir", trust_remote_code=True)
    ids = model.generate(input_ids, max_new_tokens=20)        # greedy == megatrain.generate; num_beams works too
    out = model(input_ids, output_hidden_states=True, return_dict=False)   # HF's MEGA outputs, tuples too
    AutoModel (MegaModel: last_hidden_state + pooler_output) / AutoModelForMaskedLM / ForSequenceClassification /
    ForTokenClassification / ForQuestionAnswering / ForMultipleChoice: the same folder, with the Auto classes.
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py tests/hf/test_hf_citizen.py

The mechanics (megatrain's model re-homed under transformers' names, kept in sync, hidden states observed by
hooks, gradient checkpointing per layer, the causal LM's forward and generate's cache handling) are every family's:
megatrain/hf/remote/wrapper.py. What is MEGA's here: transformers' MEGA names (the "mega" rules of the one key map,
megatrain/hf/keymap.py: attention's qk weights on `mega_layer`, the rotary bias' beta as `b_param`, each block
under a transformers-named container), transformers' MEGA init for missing weights, the pooler, the four heads,
and attention probabilities: each attention's `_attend` is wrapped to also run the same op
(megatrain.ops.attention.chunk_attention) on an identity value matrix, which returns the probabilities
[B, chunks, chunk, chunk] transformers' MEGA returns (the fused kernels keep none); under autograd the layer's
output is then computed from those probabilities. Cross-attention is refused (megatrain has none).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutputWithPooling, MaskedLMOutput, MultipleChoiceModelOutput,
                                           QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                           TokenClassifierOutput)
from transformers.utils import logging

from megatrain.hf.keymap import KEY_MAPS, to_hf_key
from megatrain.hf.mega import FAMILY, build_for_task
from megatrain.hf.remote.configuration_mega import MegaConfig
from megatrain.hf.remote.wrapper import (BackboneObserver, CausalLMMixin, MegatrainPreTrainedModel, init_tensor,
                                         is_loaded, rehome, tied_keys, wants_dict)
from megatrain.model.layers import BatchNorm, LayerNorm, RMSNorm, ScaleNorm
from megatrain.model.mega.attention import MovingAverageGatedAttention, RotaryRelativeBias, SimpleRelativeBias
from megatrain.model.mega.backbone import MegaCache
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.model.mega.heads import MegaModelWithPooler
from megatrain.ops.attention import chunk_attention

logger = logging.get_logger(__name__)
_EMBEDDING = to_hf_key(KEY_MAPS[FAMILY].embedding, "causal", FAMILY)  # the word embedding, transformers' name


def _init_as_megatrain(owner: nn.Module, name: str, t: torch.Tensor, std: float) -> None:
    """Tensor `name` of megatrain module `owner` as megatrain.model.mega.backbone.init_weights_ starts it (the qk
    weights and relative biases normal(0, std), the qk bias zero) or as the norms are built (identity)."""
    if isinstance(owner, MovingAverageGatedAttention) and name == "qk_weight":
        init_tensor(t, "normal_", std=std)
    elif isinstance(owner, MovingAverageGatedAttention) and name == "qk_bias":
        init_tensor(t, "zeros_")
    elif isinstance(owner, (RotaryRelativeBias, SimpleRelativeBias)):
        init_tensor(t, "normal_", std=std)
    elif isinstance(owner, (ScaleNorm, RMSNorm, LayerNorm, BatchNorm)):
        init_tensor(t, "zeros_" if name == "bias" else "ones_")


class MegaPreTrainedModel(MegatrainPreTrainedModel):
    config_class = MegaConfig
    base_model_prefix = "mega"
    family = FAMILY
    task: str = "masked"
    _no_split_modules = ["MegaBlock"]
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor", r"pooler\."]

    def backbone_kwargs(self) -> dict:
        return {"add_pooling_layer": False}

    def _megatrain_config(self, config: MegaConfig):
        cfg = config.to_megatrain()
        if self.task == "causal" and not cfg.is_decoder:
            # transformers builds every head from one config and only warns here; megatrain's run configs stay
            # strict (megatrain/config.py): a causal LM is a decoder, with a causal (one-directional) EMA
            logger.warning("MegaForCausalLM: config.is_decoder=False; acting as a decoder (is_decoder=True"
                           + (", bidirectional=False)" if cfg.bidirectional else ")"))
            cfg = cfg.replace(is_decoder=True, bidirectional=False)
        return cfg

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        hf = {"id2label": getattr(config, "id2label", None), "problem_type": getattr(config, "problem_type", None)}
        self.build(config, build_for_task(self.task, self._megatrain_config(config), hf))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # weights a checkpoint lacks (a new head): transformers' MEGA init for linear layers and embeddings;
        # megatrain's modules initialised everything else when built
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if module.weight is not self.get_input_embeddings().weight:  # a tied head: initialised as the embedding
                init_tensor(module.weight, "normal_", std=std)
            if module.bias is not None:
                init_tensor(module.bias, "zeros_")
        elif isinstance(module, nn.Embedding):
            init_tensor(module.weight, "normal_", std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, MultiDimDampedEMA):
            # the EMA's own init (megatrain.model.mega.ema), unless its tensors were loaded (5.x flags each tensor;
            # 4.x does not call this for a module it loaded)
            if not is_loaded(module):
                c = self.config
                module.reset_parameters(c.ema_delta_alpha_range, c.ema_beta_range, c.ema_gamma_omega_range)
        else:
            # megatrain's other tensors, wherever they are registered: on their own module, or re-homed into a
            # transformers-named container (rehome: the bindings name their megatrain owner)
            owners = self.tensor_owners()
            for name, t in module.named_parameters(recurse=False):
                owner, leaf = owners.get((id(module), name), (module, name))
                _init_as_megatrain(owner, leaf, t, std)


class MegaModel(BackboneObserver, MegaPreTrainedModel):
    """The bare backbone (transformers' MegaModel): last_hidden_state [B, L, D] and, with add_pooling_layer, the
    pooler_output [B, D] (first position -> dense -> tanh). Inside the LMs and heads it is `.mega`, built around
    their megatrain backbone (`backbone`). Hidden states: the embeddings' output, then each layer's output."""

    task = "backbone"
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor"]

    def __init__(self, config: MegaConfig, add_pooling_layer: bool = True, backbone: Optional[nn.Module] = None):
        PreTrainedModel.__init__(self, config)
        # around a given backbone its config object is the LM's: one config, shared by every megatrain module
        mt = MegaModelWithPooler(backbone.config if backbone is not None else self._megatrain_config(config),
                                 add_pooling_layer, backbone=backbone)
        object.__setattr__(self, "_mt", mt)
        self._bindings = rehome(self, mt, self.to_hf_key)
        self.observe_backbone(mt.mega, mt.mega.embeddings.word_embeddings)
        self.post_init()

    def hidden_state_points(self, backbone: nn.Module) -> list:
        return [(backbone.embeddings, "output")] + [(layer, "output") for layer in backbone.layers]

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding_layer.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding_layer.word_embeddings = value  # megatrain's embedding module itself: both trees see it
        value.register_forward_hook(self._substitute)
        self._mt.config.vocab_size = value.num_embeddings  # megatrain checks ids against it (config is shared)

    def observe_attention(self, index: int, layer: nn.Module) -> None:
        attn = layer.attn
        inner = getattr(attn, "_attend", None)
        if inner is None:
            raise RuntimeError("megatrain's MovingAverageGatedAttention has no _attend(q, k, v, bias, **mask): "
                               "output_attentions needs it (megatrain/hf/remote/modeling_mega.py)")

        def attend(q, k, v, bias, **mask):
            if self._attn is None:
                return inner(q, k, v, bias, **mask)
            # probs @ I = probs: the one attention op, on an identity value matrix (no dropout: transformers
            # returns the probabilities before it)
            eye = torch.eye(k.shape[-2], dtype=q.dtype, device=q.device).expand(*k.shape[:-1], k.shape[-2])
            probs = chunk_attention(q, k, eye, bias, scale=attn.scaling, activation=attn.attn_act_name, **mask)
            self._attn[index].append(probs)
            if not (torch.is_grad_enabled() and probs.requires_grad):
                return inner(q, k, v, bias, **mask)  # the op itself: its numbers exactly
            # under autograd the output is computed from the very probabilities returned, so that a gradient
            # reaches them (retain_grad, losses on attentions), as in transformers' eager attention: the same
            # computation as inner's (its dropouts on the probabilities and on the values), written out
            p = attn.attention_dropout.p if attn.training else 0.0
            return torch.matmul(nn.functional.dropout(probs, p) if p else probs, attn.hidden_dropout(v))

        attn._attend = attend  # an instance attribute: this model's attention modules only

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, encoder_hidden_states=None,
                **kwargs):
        return self.backbone_forward(
            lambda ids: self._mt(ids, attention_mask, token_type_ids),
            lambda out, states, probs: BaseModelOutputWithPooling(
                last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output, hidden_states=states,
                attentions=probs),
            input_ids, inputs_embeds, output_attentions, output_hidden_states, return_dict, encoder_hidden_states)


MegaPreTrainedModel.backbone_class = MegaModel


class MegaForCausalLM(CausalLMMixin, MegaPreTrainedModel, GenerationMixin):
    task = "causal"
    cache_class = MegaCache
    _tied_weights_keys = tied_keys("lm_head", _EMBEDDING)


class MegaForMaskedLM(MegaPreTrainedModel):
    task = "masked"
    _tied_weights_keys = tied_keys("mlm_head", _EMBEDDING)

    def get_output_embeddings(self):
        return self.mlm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.mlm_head = new

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, encoder_hidden_states=None,
                **kwargs):
        self.refuse_cross_attention(encoder_hidden_states)
        mt = self.megatrain()
        out, states, probs = self.observed(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        res = MaskedLMOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()


class MegaForSequenceClassification(MegaPreTrainedModel):
    task = "sequence-classification"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        mt = self.megatrain()
        out, states, probs = self.observed(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        if mt.problem_type is not None:
            self.config.problem_type = mt.problem_type
        res = SequenceClassifierOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()


class MegaForTokenClassification(MegaPreTrainedModel):
    task = "token-classification"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        mt = self.megatrain()
        out, states, probs = self.observed(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        res = TokenClassifierOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()


class MegaForQuestionAnswering(MegaPreTrainedModel):
    task = "question-answering"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        mt = self.megatrain()
        out, states, probs = self.observed(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, start_positions,
                                                      end_positions))
        res = QuestionAnsweringModelOutput(loss=out.loss, start_logits=out.start_logits, end_logits=out.end_logits,
                                           hidden_states=states, attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()


class MegaForMultipleChoice(MegaPreTrainedModel):
    task = "multiple-choice"
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor"]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        given = input_ids if input_ids is not None else inputs_embeds
        if given is None or given.dim() != (3 if input_ids is not None else 4):
            raise ValueError("MegaForMultipleChoice: give input_ids [batch, choices, length] or inputs_embeds "
                             "[batch, choices, length, hidden]")
        choices = given.shape[:3]
        mt = self.megatrain()
        # each choice is one row of the backbone: the rows' embeddings replace theirs (MegaModel._substitute)
        out, states, probs = self.observed(
            None if input_ids is None else input_ids.reshape(-1, choices[-1]),
            None if inputs_embeds is None else inputs_embeds.reshape(-1, *inputs_embeds.shape[2:]),
            output_hidden_states, output_attentions,
            lambda ids: mt(ids.reshape(choices), attention_mask, token_type_ids, labels=labels))
        res = MultipleChoiceModelOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()


# auto_map of an export: Auto class -> class name in this module
AUTO_CLASSES = {
    "AutoModel": "MegaModel",
    "AutoModelForCausalLM": "MegaForCausalLM",
    "AutoModelForMaskedLM": "MegaForMaskedLM",
    "AutoModelForSequenceClassification": "MegaForSequenceClassification",
    "AutoModelForTokenClassification": "MegaForTokenClassification",
    "AutoModelForQuestionAnswering": "MegaForQuestionAnswering",
    "AutoModelForMultipleChoice": "MegaForMultipleChoice",
}
