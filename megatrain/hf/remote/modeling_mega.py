"""transformers PreTrainedModel classes around megatrain's MEGA (remote code; 4.57.x and 5.x).

    model = AutoModelForCausalLM.from_pretrained("hf_dir", trust_remote_code=True)
    ids = model.generate(input_ids, max_new_tokens=20)        # greedy == megatrain.generate; num_beams works too
    out = model(input_ids, output_hidden_states=True, return_dict=False)   # HF's MEGA outputs, tuples too
    AutoModel (MegaModel: last_hidden_state + pooler_output) / AutoModelForMaskedLM / ForSequenceClassification /
    ForTokenClassification / ForQuestionAnswering / ForMultipleChoice: the same folder, with the Auto classes.
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py tests/hf/test_hf_citizen.py

One model implementation: each class builds the megatrain model (megatrain.model) and *re-homes its modules*
under transformers' MEGA names, so the registered module tree is HF's and the state-dict keys are transformers'
(the one key map, megatrain/hf/format.py), while the forward is megatrain's. The rule (`_rehome`): a megatrain
module whose every tensor keeps its relative name under one transformers path is registered there itself (the
real nn.Linear / nn.Embedding / EMA / norm objects: PEFT, quantizers and resize_token_embeddings find them);
where transformers names a tensor differently (the rotary bias' beta is `b_param`, the attention's qk weights sit
on `mega_layer`) the very Parameter object is registered again under transformers' name in a plain container. The
megatrain model itself is not a registered submodule (its names would be a second set of keys).

Both trees hold the same objects until someone replaces one in the transformers tree: PEFT swaps an nn.Linear for
a LoRA layer, resize_token_embeddings sets a new embedding, loading may replace a Parameter (meta-device init,
dtype casts). `_sync()` copies such replacements into the megatrain tree before every forward, so megatrain's
forward always runs what the transformers tree holds.

Hidden states and attention probabilities are observed, not recomputed by a second model: forward hooks on
megatrain's embedding and layers record their outputs during the one forward (cut back to the input length, and
what follows is computed from the recorded tensor, so gradients reach it; joined when a cached prompt runs in two
pieces), and each attention's `_attend` is wrapped to also run the same op (megatrain.ops.attention.chunk_attention)
on an identity value matrix, which returns the probabilities [B, chunks, chunk, chunk] transformers' MEGA returns
(the fused kernels keep none); under autograd the layer's output is then computed from those probabilities.
Gradient checkpointing: each `layers.i` container is a transformers GradientCheckpointingLayer through which its
megatrain block runs (transformers' checkpoint function, kwargs and every_n_layers apply there); the EMA and FFN
inside are nested checkpoints of megatrain's own runner (parallel/checkpointing.py).
inputs_embeds replace the embedding lookup the same way (a hook on the word embedding returns the given vectors).
Generation: past_key_values is megatrain's MegaCache (per layer: EMA state + current-chunk keys/values), carried
through transformers' GenerationMixin; beam search reorders it (_reorder_cache). Cross-attention is refused
(megatrain has none).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutputWithPooling, CausalLMOutputWithPast, MaskedLMOutput,
                                           MultipleChoiceModelOutput, QuestionAnsweringModelOutput,
                                           SequenceClassifierOutput, TokenClassifierOutput)
from transformers.utils import logging

from megatrain.hf.format import build_for_task, to_hf_key
from megatrain.hf.remote.configuration_mega import MegaConfig
from megatrain.model.mega.attention import MovingAverageGatedAttention, RotaryRelativeBias, SimpleRelativeBias
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.model.layers import BatchNorm, LayerNorm, RMSNorm, ScaleNorm
from megatrain.model.mega.heads import MegaModelWithPooler
from megatrain.model.mega.backbone import MegaCache
from megatrain.ops.attention import chunk_attention
from megatrain.model.pieces import PIECES
from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing

logger = logging.get_logger(__name__)
try:  # transformers >= 4.52: the per-layer checkpointing protocol (Trainer, PEFT and 5.x's tests find these layers)
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:
    GradientCheckpointingLayer = None
_TF_MAJOR = int(transformers.__version__.split(".")[0])
_EMBEDDING = "mega.embedding_layer.word_embeddings.weight"


def _tied_keys(head: str):
    # transformers 5.x names each tied weight's source; 4.x lists the tied keys
    return {f"{head}.weight": _EMBEDDING} if _TF_MAJOR >= 5 else [f"{head}.weight"]


def _init(t: torch.Tensor, fn: str, **kw) -> None:
    """torch.nn.init's `fn` ("normal_", "zeros_", "ones_") on `t`; in transformers 5.x its own guarded twin, which
    skips tensors it has loaded (4.x calls _init_weights only for modules with missing weights)."""
    try:
        from transformers import initialization as init
    except ImportError:
        init = torch.nn.init
    getattr(init, fn)(t, **kw)


def _init_as_megatrain(owner: nn.Module, name: str, t: torch.Tensor, std: float) -> None:
    """Tensor `name` of megatrain module `owner` as megatrain.model.mega.backbone.init_weights_ starts it (the qk
    weights and relative biases normal(0, std), the qk bias zero) or as the norms are built (identity)."""
    if isinstance(owner, MovingAverageGatedAttention) and name == "qk_weight":
        _init(t, "normal_", std=std)
    elif isinstance(owner, MovingAverageGatedAttention) and name == "qk_bias":
        _init(t, "zeros_")
    elif isinstance(owner, (RotaryRelativeBias, SimpleRelativeBias)):
        _init(t, "normal_", std=std)
    elif isinstance(owner, (ScaleNorm, RMSNorm, LayerNorm, BatchNorm)):
        _init(t, "zeros_" if name == "bias" else "ones_")


class _Names(nn.Module):
    """A transformers-named container: modules and tensors re-homed from megatrain (see the module docstring)."""


if GradientCheckpointingLayer is not None:
    class _CheckpointingNames(_Names, GradientCheckpointingLayer):
        """The transformers-named container of one megatrain MegaBlock, as a GradientCheckpointingLayer: the block's
        forward runs through it (see _as_checkpointing_layer), so transformers' checkpoint function, hooks on the
        layer and every_n_layers act on the layer transformers sees."""

        def forward(self, *args, **kwargs):
            return self._block_forward(*args, **kwargs)
else:
    _CheckpointingNames = None


def _as_checkpointing_layer(holder: nn.Module, block: nn.Module) -> Optional[nn.Module]:
    """Make `holder` (the module at transformers' `layers.i`) the GradientCheckpointingLayer through which megatrain's
    `block` runs: the block's forward calls the holder, whose (checkpointed) forward is the block's own. Returns the
    holder (None without GradientCheckpointingLayer: transformers < 4.52)."""
    if _CheckpointingNames is None:
        return None
    if holder is block or not isinstance(holder, _Names):  # re-homed as it is: nothing to route through
        raise RuntimeError("megatrain's MegaBlock is expected under a transformers-named container (_rehome)")
    if not isinstance(holder, _CheckpointingNames):
        holder.__class__ = _CheckpointingNames
        object.__setattr__(holder, "_block_forward", functools.partial(type(block).forward, block))
        block.forward = lambda *args, **kwargs: holder(*args, **kwargs)
    return holder


def _rehome(hf_root: nn.Module, mt_root: nn.Module, hf_name: Callable[[str], str], skip: tuple = ()) -> list:
    """Register mt_root's modules/tensors under hf_root at hf_name(megatrain key) (the rule in the module
    docstring); `skip`: megatrain submodule names left out (re-homed elsewhere). Returns the bindings _sync uses."""
    bindings = []

    def box(path: str) -> nn.Module:
        node = hf_root
        for part in path.split(".") if path else ():
            if node._modules.get(part) is None:
                node.add_module(part, _Names())
            node = node._modules[part]
        return node

    def tensors(mod: nn.Module) -> list:
        return ([n for n, _ in mod.named_parameters(remove_duplicate=False)]
                + [n for n, _ in mod.named_buffers(remove_duplicate=False)])

    def visit(prefix: str, mod: nn.Module) -> None:
        names = tensors(mod)
        if prefix and names:
            homes = [hf_name(f"{prefix}.{n}") for n in names]
            base = homes[0][:-len(names[0]) - 1] if homes[0].endswith("." + names[0]) else None
            if base is not None and all(h == f"{base}.{n}" for n, h in zip(names, homes)):
                parent_path, _, leaf = base.rpartition(".")
                mt_parent_path, _, mt_leaf = prefix.rpartition(".")
                parent = box(parent_path)
                parent.add_module(leaf, mod)
                bindings.append(("module", mt_root.get_submodule(mt_parent_path), mt_leaf, parent, leaf))
                return
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for n, t in table.items():
                if t is None:
                    continue
                path, _, leaf = hf_name(f"{prefix}.{n}" if prefix else n).rpartition(".")
                holder = box(path)
                if kind == "p":
                    holder.register_parameter(leaf, t)
                else:
                    holder.register_buffer(leaf, t)
                bindings.append((kind, mod, n, holder, leaf))
        for n, child in mod._modules.items():
            if child is not None and not (not prefix and n in skip):
                visit(f"{prefix}.{n}" if prefix else n, child)

    visit("", mt_root)
    return bindings


def _sync_bindings(bindings: list) -> None:
    for kind, mt_owner, mt_leaf, hf_owner, hf_leaf in bindings:
        table = {"module": "_modules", "p": "_parameters", "b": "_buffers"}[kind]
        src, dst = getattr(hf_owner, table), getattr(mt_owner, table)
        if dst.get(mt_leaf) is not src[hf_leaf]:
            dst[mt_leaf] = src[hf_leaf]


def _default(value, config, name: str):
    return value if value is not None else getattr(config, name, False)


def _return_dict(return_dict, config) -> bool:
    if return_dict is not None:
        return return_dict
    return getattr(config, "use_return_dict", getattr(config, "return_dict", True))


class MegaPreTrainedModel(PreTrainedModel):
    config_class = MegaConfig
    base_model_prefix = "mega"
    task: str = "masked"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegaBlock"]
    _is_stateful = True  # the EMA state: no transformers key/value cache object
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor", r"pooler\."]

    def _megatrain_config(self, config: MegaConfig):
        cfg = config.to_megatrain()
        if self.task == "causal" and not cfg.is_decoder:
            # transformers builds every head from one config and only warns here; megatrain's run configs stay
            # strict (megatrain/config.py): a causal LM is a decoder, with a causal (one-directional) EMA
            logger.warning("MegaForCausalLM: config.is_decoder=False; acting as a decoder (is_decoder=True"
                           + (", bidirectional=False)" if cfg.bidirectional else ")"))
            cfg = cfg.replace(is_decoder=True, bidirectional=False)
        return cfg

    def _build(self, config: MegaConfig, mt: nn.Module) -> None:
        """Hold megatrain model `mt` (unregistered) and re-home its modules here; the backbone as `self.mega`."""
        object.__setattr__(self, "_mt", mt)
        self.mega = MegaModel(config, add_pooling_layer=False, backbone=mt.mega)
        self._bindings = _rehome(self, mt, lambda k: to_hf_key(k, self.task), skip=("mega",))

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        hf = {"id2label": getattr(config, "id2label", None), "problem_type": getattr(config, "problem_type", None)}
        self._build(config, build_for_task(self.task, self._megatrain_config(config), hf))
        self.post_init()

    def _sync(self) -> None:
        if isinstance(self.mega, MegaModel):
            self.mega._sync()
        _sync_bindings(self._bindings)
        if hasattr(self._mt, "tie_weights") and self._mt.config.tie_word_embeddings:
            self._mt.tie_weights()

    def _megatrain(self):
        """The megatrain model, bound to this model's current modules and tensors."""
        self._sync()
        return self._mt

    def _init_weights(self, module: nn.Module) -> None:
        # weights a checkpoint lacks (a new head): transformers' MEGA init for linear layers and embeddings;
        # megatrain's modules initialised everything else when built
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if module.weight is not self.get_input_embeddings().weight:  # a tied head: initialised as the embedding
                _init(module.weight, "normal_", std=std)
            if module.bias is not None:
                _init(module.bias, "zeros_")
        elif isinstance(module, nn.Embedding):
            _init(module.weight, "normal_", std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, MultiDimDampedEMA):
            # the EMA's own init (megatrain.model.mega.ema), unless its tensors were loaded (5.x flags each tensor;
            # 4.x does not call this for a module it loaded)
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)):
                c = self.config
                module.reset_parameters(c.ema_delta_alpha_range, c.ema_beta_range, c.ema_gamma_omega_range)
        else:
            # megatrain's other tensors, wherever they are registered: on their own module, or re-homed into a
            # transformers-named container (_rehome: the bindings name their megatrain owner)
            owners = self._tensor_owners()
            for name, t in module.named_parameters(recurse=False):
                owner, leaf = owners.get((id(module), name), (module, name))
                _init_as_megatrain(owner, leaf, t, std)

    def _tensor_owners(self) -> dict:
        """(id(transformers holder), name) -> (megatrain module, name) for every re-homed tensor of this model."""
        cached = self.__dict__.get("_owners")
        if cached is None:
            cached = {(id(hf_owner), hf_leaf): (mt_owner, mt_leaf)
                      for m in self.modules() if isinstance(m, MegaPreTrainedModel)
                      for kind, mt_owner, mt_leaf, hf_owner, hf_leaf in m._bindings if kind == "p"}
            self.__dict__["_owners"] = cached
        return cached

    def mark_tied_weights_as_initialized(self, loading_info):
        # transformers 5.x (from_pretrained): it flags every tied target as initialised before initialising what
        # the checkpoint lacked. Here a tied head and the embedding are one Parameter from construction on
        # (megatrain's tie), so the flag would mark a missing embedding as loaded: give the target its own tensor
        # first (tie_weights, right after, ties them again)
        for target, source in (getattr(self, "all_tied_weights_keys", None) or {}).items():
            t = self.get_parameter(target)
            if t is self.get_parameter(source):
                holder, _, leaf = target.rpartition(".")
                self.get_submodule(holder).register_parameter(
                    leaf, nn.Parameter(torch.empty_like(t), requires_grad=t.requires_grad))
        return super().mark_tied_weights_as_initialized(loading_info)

    def train(self, mode: bool = True):
        super().train(mode)
        self._mt.train(mode)  # megatrain's parameter-free modules (dropout) are not in the transformers tree
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.mega.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mega.set_input_embeddings(value)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        # each layer through transformers' checkpoint function (its gradient_checkpointing_kwargs apply; the layers
        # are GradientCheckpointingLayers), the EMA and the FFN inside it nested through megatrain's own runner
        # (parallel/checkpointing.py, non-reentrant torch.utils.checkpoint), applied from outside the model as the
        # trainer applies it. Without GradientCheckpointingLayer (transformers < 4.52) megatrain's runner does all.
        from torch.utils.checkpoint import checkpoint
        func = gradient_checkpointing_func or functools.partial(checkpoint, use_reentrant=False)
        for m in self.modules():
            if isinstance(m, MegaPreTrainedModel):
                m.gradient_checkpointing = enable
        layers = [m for m in self.modules() if _CheckpointingNames is not None and isinstance(m, _CheckpointingNames)]
        if any(isinstance(m, BatchNorm) for m in self._mt.modules()):
            # a recompute by transformers' function would count the batch in the running statistics twice;
            # megatrain's runner does not (BatchNorm.update_stats): it checkpoints the layers too
            for layer in layers:
                layer.gradient_checkpointing = False
            layers = []
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = enable and i % every_n_layers == 0
            layer._gradient_checkpointing_func = func
        if enable and every_n_layers != 1 and not layers:
            raise NotImplementedError(f"every_n_layers={every_n_layers}: megatrain's runner checkpoints every layer "
                                      "(1); others need transformers' GradientCheckpointingLayer (>= 4.52) and no "
                                      "batchnorm")
        self._mt.config.gradient_checkpointing = enable
        pieces = frozenset(p for p in PIECES if not (layers and p == "layer"))
        apply_checkpointing(self._mt, CheckpointPolicy(pieces=pieces) if enable else None)

    def _run(self, input_ids, inputs_embeds, output_hidden_states, output_attentions, call):
        """call(input_ids) under the hooks: (its result, the hidden states or None, the attentions or None)."""
        return self.mega._observed(input_ids, inputs_embeds,
                                   _default(output_hidden_states, self.config, "output_hidden_states"),
                                   _default(output_attentions, self.config, "output_attentions"), call)

    @staticmethod
    def _refuse(encoder_hidden_states=None) -> None:
        if encoder_hidden_states is not None:
            raise NotImplementedError("cross-attention (encoder_hidden_states) is not supported by megatrain's MEGA")


class MegaModel(MegaPreTrainedModel):
    """The bare backbone (transformers' MegaModel): last_hidden_state [B, L, D] and, with add_pooling_layer, the
    pooler_output [B, D] (first position -> dense -> tanh). Inside the LMs and heads it is `.mega`, built around
    their megatrain backbone (`backbone`)."""

    task = "backbone"
    _keys_to_ignore_on_load_unexpected = [r"_float_tensor"]

    def __init__(self, config: MegaConfig, add_pooling_layer: bool = True, backbone: Optional[nn.Module] = None):
        PreTrainedModel.__init__(self, config)
        # around a given backbone its config object is the LM's: one config, shared by every megatrain module
        mt = MegaModelWithPooler(backbone.config if backbone is not None else self._megatrain_config(config),
                                 add_pooling_layer, backbone=backbone)
        object.__setattr__(self, "_mt", mt)
        self._bindings = _rehome(self, mt, lambda k: to_hf_key(k, "backbone"))
        self._hidden: Optional[list] = None
        self._attn: Optional[list] = None
        self._embeds: Optional[list] = None
        self._length = 0
        backbone_mt = mt.mega
        backbone_mt.embeddings.register_forward_hook(self._record(0))
        for i, layer in enumerate(backbone_mt.layers):
            _as_checkpointing_layer(self.get_submodule(f"layers.{i}"), layer)
            layer.register_forward_hook(self._record(i + 1))
            self._observe_attention(i, layer.attn)
        backbone_mt.embeddings.word_embeddings.register_forward_hook(self._substitute)
        self.post_init()

    def _sync(self) -> None:
        _sync_bindings(self._bindings)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding_layer.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding_layer.word_embeddings = value  # megatrain's embedding module itself: both trees see it
        value.register_forward_hook(self._substitute)
        self._mt.config.vocab_size = value.num_embeddings  # megatrain checks ids against it (config is shared)

    # ---- observation hooks (see the module docstring) ----
    def _record(self, index: int):
        def hook(module, args, output):
            if self._hidden is None or not torch.is_tensor(output):
                return None
            n = self._length
            if output.shape[1] > n:
                # megatrain's chunk padding: the real positions are recorded and what follows is computed from
                # them (a gradient reaches the returned hidden state, as in transformers' MEGA: retain_grad works)
                real = output[:, :n]
                self._hidden[index].append(real)
                return torch.cat([real, output[:, n:]], dim=1)
            self._hidden[index].append(output)
            return None
        return hook

    def _observe_attention(self, index: int, attn: nn.Module) -> None:
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

    def _substitute(self, module, args, output):
        if self._embeds is None:
            return None
        given, pos = self._embeds
        n = output.shape[1]
        take = given[:, pos:pos + n].to(output.dtype)
        self._embeds[1] = pos + take.shape[1]
        # positions past the given vectors are megatrain's chunk padding: keep the pad embedding there
        return torch.cat([take, output[:, take.shape[1]:]], dim=1)

    def _observed(self, input_ids, inputs_embeds, hidden: bool, attentions: bool, call):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            input_ids = torch.full(inputs_embeds.shape[:2], pad, dtype=torch.long, device=inputs_embeds.device)
            self._embeds = [inputs_embeds, 0]
        n = len(self._mt.mega.layers)
        self._length = input_ids.shape[1]
        self._hidden = [[] for _ in range(n + 1)] if hidden else None
        self._attn = [[] for _ in range(n)] if attentions else None
        try:
            result = call(input_ids)
            states = probs = None
            if hidden:
                length = input_ids.shape[1]
                # one piece: the very tensor the next layer took (see _record); a cached prompt that ran in
                # two pieces: joined
                states = tuple(torch.cat(parts, dim=1)[:, -length:] if len(parts) > 1 else parts[0]
                               for parts in self._hidden)
            if attentions:  # one entry per attention call (a cached prompt may run in two pieces: the last)
                probs = tuple(parts[-1] for parts in self._attn)
        finally:
            self._hidden, self._attn, self._embeds = None, None, None
        return result, states, probs

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, encoder_hidden_states=None,
                **kwargs):
        self._refuse(encoder_hidden_states)
        self._sync()
        out, states, probs = self._observed(input_ids, inputs_embeds,
                                            _default(output_hidden_states, self.config, "output_hidden_states"),
                                            _default(output_attentions, self.config, "output_attentions"),
                                            lambda ids: self._mt(ids, attention_mask, token_type_ids))
        res = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                         hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


class MegaForCausalLM(MegaPreTrainedModel, GenerationMixin):
    task = "causal"
    _tied_weights_keys = _tied_keys("lm_head")

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, encoder_hidden_states=None, shift_labels=None, **kwargs):
        self._refuse(encoder_hidden_states)
        cache = past_key_values if isinstance(past_key_values, MegaCache) else None
        mt = self._megatrain()
        if cache is None and use_cache is True:
            # asked for explicitly (not from config.use_cache: a plain forward stays the one whole-sequence pass):
            # a fresh cache, filled by this forward and returned to continue from
            cache = mt.new_cache()
        # shift_labels (transformers 5.x: targets already aligned with the logits, as sequence-parallel trainers
        # pass them) are megatrain's labels_shifted; they take the place of labels
        target = labels if shift_labels is None else shift_labels
        out, states, probs = self._run(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=target, cache=cache,
                                                      labels_shifted=shift_labels is not None))
        res = CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=cache, hidden_states=states,
                                     attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if not isinstance(past_key_values, MegaCache):
            # the first step: the whole prompt (or its embeddings); a fresh cache the model fills
            first = {"input_ids": input_ids} if inputs_embeds is None or input_ids.shape[1] else {
                "inputs_embeds": inputs_embeds}
            return {**first, "attention_mask": attention_mask, "past_key_values": self._megatrain().new_cache()}
        new = input_ids[:, past_key_values.pos:] if input_ids.shape[1] > past_key_values.pos else input_ids[:, -1:]
        mask = None
        if attention_mask is not None:
            m = attention_mask[:, -new.shape[1]:]
            mask = None if bool(m.all()) else m
        return {"input_ids": new, "attention_mask": mask, "past_key_values": past_key_values}

    def _reorder_cache(self, past_key_values: MegaCache, beam_idx: torch.Tensor) -> MegaCache:
        # beam search: every per-row tensor of every layer follows its beam (EMA state, current-chunk K/V/mask)
        for lc in past_key_values.layers:
            for name in ("ema_state", "key", "value", "key_mask"):
                t = getattr(lc, name)
                if t is not None:
                    setattr(lc, name, t.index_select(0, beam_idx.to(t.device)))
        return past_key_values


class MegaForMaskedLM(MegaPreTrainedModel):
    task = "masked"
    _tied_weights_keys = _tied_keys("mlm_head")

    def get_output_embeddings(self):
        return self.mlm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.mlm_head = new

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, encoder_hidden_states=None,
                **kwargs):
        self._refuse(encoder_hidden_states)
        mt = self._megatrain()
        out, states, probs = self._run(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        res = MaskedLMOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


class MegaForSequenceClassification(MegaPreTrainedModel):
    task = "sequence-classification"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        mt = self._megatrain()
        out, states, probs = self._run(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        if mt.problem_type is not None:
            self.config.problem_type = mt.problem_type
        res = SequenceClassifierOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


class MegaForTokenClassification(MegaPreTrainedModel):
    task = "token-classification"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        mt = self._megatrain()
        out, states, probs = self._run(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, labels=labels))
        res = TokenClassifierOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


class MegaForQuestionAnswering(MegaPreTrainedModel):
    task = "question-answering"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        mt = self._megatrain()
        out, states, probs = self._run(input_ids, inputs_embeds, output_hidden_states, output_attentions,
                                       lambda ids: mt(ids, attention_mask, token_type_ids, start_positions,
                                                      end_positions))
        res = QuestionAnsweringModelOutput(loss=out.loss, start_logits=out.start_logits, end_logits=out.end_logits,
                                           hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


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
        mt = self._megatrain()
        # each choice is one row of the backbone: the rows' embeddings replace theirs (MegaModel._substitute)
        out, states, probs = self._run(
            None if input_ids is None else input_ids.reshape(-1, choices[-1]),
            None if inputs_embeds is None else inputs_embeds.reshape(-1, *inputs_embeds.shape[2:]),
            output_hidden_states, output_attentions,
            lambda ids: mt(ids.reshape(choices), attention_mask, token_type_ids, labels=labels))
        res = MultipleChoiceModelOutput(loss=out.loss, logits=out.logits, hidden_states=states, attentions=probs)
        return res if _return_dict(return_dict, self.config) else res.to_tuple()


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
