"""transformers PreTrainedModel classes around megatrain's MEGA (remote code; 4.57.x and 5.x).

    model = AutoModelForCausalLM.from_pretrained("hf_dir", trust_remote_code=True)
    ids = model.generate(input_ids, max_new_tokens=20)        # greedy == megatrain.generate
    AutoModelForMaskedLM / ForSequenceClassification / ForTokenClassification / ForQuestionAnswering /
    ForMultipleChoice / AutoModel: the same folder, fine-tuned with the Auto classes.

Each class holds the megatrain model (megatrain.model: one implementation) *outside* its registered modules and
registers the very same Parameter objects again under transformers' MEGA names (the key map of
megatrain.hf.format.py), so state_dict(), from_pretrained and save_pretrained speak transformers' names in every
transformers version without its (version-specific) key-renaming hooks. Loading may replace those Parameter
objects (meta-device init, dtype casts): `_sync()` re-binds the megatrain modules to the registered ones before
every forward.

Generation: past_key_values is megatrain's MegaCache (per layer: EMA state + current-chunk keys/values), carried
through transformers' GenerationMixin (greedy and sampling; beam search would need the cache reordered: not
supported). Any input length works (megatrain pads to whole chunks inside).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutput, CausalLMOutputWithPast, MaskedLMOutput,
                                           MultipleChoiceModelOutput, QuestionAnsweringModelOutput,
                                           SequenceClassifierOutput, TokenClassifierOutput)

from megatrain.hf.format import build_for_task, to_hf_key
from megatrain.hf.remote.configuration_mega import MegaConfig
from megatrain.model.mega import MegaCache


def _init_normal(t: torch.Tensor, std: float) -> None:
    try:  # transformers 5.x: skips tensors it has loaded
        from transformers import initialization as init
        init.normal_(t, mean=0.0, std=std)
    except ImportError:  # 4.x calls _init_weights only for modules with missing weights
        with torch.no_grad():
            t.normal_(0.0, std)


def _init_zeros(t: torch.Tensor) -> None:
    try:
        from transformers import initialization as init
        init.zeros_(t)
    except ImportError:
        with torch.no_grad():
            t.zero_()


class _Alias(nn.Module):
    """A container of transformers-named parameters; `kind` is the megatrain module type it mirrors."""

    def __init__(self, kind: str = ""):
        super().__init__()
        self.kind = kind


class MegaPreTrainedModel(PreTrainedModel):
    config_class = MegaConfig
    base_model_prefix = "mega"
    task: str = "masked"
    _is_stateful = True  # the EMA state: no transformers key/value cache object
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor", r"pooler\."]

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        hf = {"id2label": getattr(config, "id2label", None), "problem_type": getattr(config, "problem_type", None)}
        model = build_for_task(self.task, config.to_megatrain(), hf)
        object.__setattr__(self, "_mt", model)  # not a registered submodule: see the module docstring
        self._register_aliases()
        self.post_init()

    # ---- transformers names for megatrain's tensors ----
    def _hf_name(self, key: str) -> str:
        return to_hf_key(key, self.task)

    def _register_aliases(self) -> None:
        self._bindings = []
        mt = self._mt
        for kind, items in (("p", mt.named_parameters()), ("b", mt.named_buffers())):
            for name, t in items:
                if name == "lm_head.weight" and mt.config.tie_word_embeddings:
                    continue  # the embedding (_sync re-ties; under meta-device init the tie is not kept)
                mod_path, leaf = name.rsplit(".", 1)
                owner_mod = mt.get_submodule(mod_path)
                path, hf_leaf = self._hf_name(name).rsplit(".", 1)
                box = self
                for part in path.split("."):
                    if part not in box._modules:
                        box.add_module(part, _Alias())
                    box = box._modules[part]
                box.kind = type(owner_mod).__name__
                if kind == "p":
                    box.register_parameter(hf_leaf, t)
                else:
                    box.register_buffer(hf_leaf, t)
                self._bindings.append((owner_mod, leaf, box, hf_leaf, kind))

    def _sync(self) -> None:
        for owner_mod, leaf, box, hf_leaf, kind in self._bindings:
            src = box._parameters if kind == "p" else box._buffers
            dst = owner_mod._parameters if kind == "p" else owner_mod._buffers
            if dst[leaf] is not src[hf_leaf]:
                dst[leaf] = src[hf_leaf]
        if hasattr(self._mt, "tie_weights"):
            self._mt.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        # weights a checkpoint lacks (a new head): transformers' MEGA init for linear layers and embeddings;
        # megatrain's modules initialised everything else when built
        if not isinstance(module, _Alias):
            return
        std = self.config.initializer_range
        if module.kind == "Linear":
            _init_normal(module.weight, std)
            if getattr(module, "bias", None) is not None:
                _init_zeros(module.bias)
        elif module.kind == "Embedding":
            _init_normal(module.weight, std)

    def train(self, mode: bool = True):
        super().train(mode)
        self._mt.train(mode)
        return self

    def get_input_embeddings(self) -> nn.Module:
        self._sync()
        return self._mt.get_input_embeddings()

    def get_output_embeddings(self):
        return None  # tying is megatrain's (see _sync)

    def _megatrain(self):
        """The megatrain model, bound to this model's current tensors."""
        self._sync()
        return self._mt


class MegaModel(MegaPreTrainedModel):
    """The bare backbone: last_hidden_state [B, L, D] (transformers' optional pooler is not computed)."""

    task = "masked"

    def _hf_name(self, key: str) -> str:  # the backbone alone: transformers names it without "mega."
        return to_hf_key(key, self.task).removeprefix("mega.")

    def __init__(self, config: MegaConfig):
        PreTrainedModel.__init__(self, config)
        cfg = config.to_megatrain()
        from megatrain.model.mega import MegaModel as _Backbone
        object.__setattr__(self, "_mt", _Backbone(cfg))
        self._register_aliases_backbone()
        self.post_init()

    def _register_aliases_backbone(self) -> None:
        # the backbone's keys are the LM's without "mega.": reuse the one key map through that prefix
        wrapper = nn.Module()
        wrapper.mega = self._mt
        real = self._mt
        object.__setattr__(self, "_mt", wrapper)
        self._register_aliases()
        object.__setattr__(self, "_mt", real)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
        h = self._megatrain()(input_ids, attention_mask, token_type_ids)
        return BaseModelOutput(last_hidden_state=h)


class MegaForCausalLM(MegaPreTrainedModel, GenerationMixin):
    task = "causal"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, past_key_values=None,
                use_cache=None, return_dict=None, **kwargs):
        cache = past_key_values if isinstance(past_key_values, MegaCache) else None
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, labels=labels, cache=cache)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        if not isinstance(past_key_values, MegaCache):
            # the first step: the whole prompt; a fresh cache the model fills (EMA state + current chunk)
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "past_key_values": self._megatrain().new_cache()}
        new = input_ids[:, past_key_values.pos:]
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, past_key_values.pos:].all()):
            mask = attention_mask[:, past_key_values.pos:]
        return {"input_ids": new, "attention_mask": mask, "past_key_values": past_key_values}

    def _reorder_cache(self, past_key_values, beam_idx):
        raise NotImplementedError("MEGA's generation cache cannot be reordered: beam search is not supported")


class MegaForMaskedLM(MegaPreTrainedModel):
    task = "masked"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, labels=labels)
        return MaskedLMOutput(loss=out.loss, logits=out.logits)


class MegaForSequenceClassification(MegaPreTrainedModel):
    task = "sequence-classification"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, labels=labels)
        if self._mt.problem_type is not None:
            self.config.problem_type = self._mt.problem_type
        return SequenceClassifierOutput(loss=out.loss, logits=out.logits)


class MegaForTokenClassification(MegaPreTrainedModel):
    task = "token-classification"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, labels=labels)
        return TokenClassifierOutput(loss=out.loss, logits=out.logits)


class MegaForQuestionAnswering(MegaPreTrainedModel):
    task = "question-answering"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, return_dict=None, **kwargs):
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=out.loss, start_logits=out.start_logits,
                                            end_logits=out.end_logits)


class MegaForMultipleChoice(MegaPreTrainedModel):
    task = "multiple-choice"
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor"]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                **kwargs):
        out = self._megatrain()(input_ids, attention_mask, token_type_ids, labels=labels)
        return MultipleChoiceModelOutput(loss=out.loss, logits=out.logits)


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
