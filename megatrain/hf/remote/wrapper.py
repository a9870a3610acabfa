"""The mechanics every family's transformers classes share: megatrain's own model inside a PreTrainedModel (remote
code; transformers 4.57.x and 5.x). The families' modules (modeling_mega.py, modeling_megalodon.py) subclass these.

    class XPreTrainedModel(MegatrainPreTrainedModel): family, config_class, base_model_prefix, _init_weights
    class XModel(BackboneObserver, XPreTrainedModel): the bare backbone; names its hidden-state hook points
    class XForCausalLM(CausalLMMixin, XPreTrainedModel, GenerationMixin): forward, generate's cache handling
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py tests/hf/test_hf_citizen.py

One model implementation: each class builds the megatrain model and *re-homes its modules* under transformers'
names, so the registered module tree is transformers' and the state-dict keys are those of the one key map
(megatrain/hf/keymap.py), while the forward is megatrain's. The rule (`rehome`): a megatrain module whose every
tensor keeps its relative name under one transformers path is registered there itself (the real nn.Linear /
nn.Embedding / norm objects: PEFT, quantizers and resize_token_embeddings find them); where transformers names a
tensor differently the very Parameter object is registered again under transformers' name in a plain container.
The megatrain model itself is not a registered submodule (its names would be a second set of keys).

Both trees hold the same objects until someone replaces one in the transformers tree: PEFT swaps an nn.Linear for
a LoRA layer, resize_token_embeddings sets a new embedding, loading may replace a Parameter (meta-device init,
dtype casts). `sync()` copies such replacements into the megatrain tree before every forward, so megatrain's
forward always runs what the transformers tree holds.

Hidden states are observed, not recomputed by a second model: hooks at the family's hook points (a module's
input or output) record them during the one forward (cut back to the input length, and what follows is computed
from the recorded tensor, so gradients reach it; joined when a cached prompt runs in two pieces). inputs_embeds
replace the output of the word embedding the same way (a hook on it returns the given vectors).
Gradient checkpointing: each transformers `layers.i` is a GradientCheckpointingLayer through which its megatrain
block runs (transformers' checkpoint function, kwargs and every_n_layers apply there); the pieces inside it are
nested checkpoints of megatrain's own runner (parallel/checkpointing.py).
Generation: past_key_values is the family's megatrain cache (per layer: its states + current-chunk keys/values),
carried through transformers' GenerationMixin; beam search reorders every per-row tensor in it (_reorder_cache).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megatrain.hf.keymap import to_hf_key
from megatrain.model.layers import BatchNorm
from megatrain.model.pieces import PIECES
from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing

try:  # transformers >= 4.52: the per-layer checkpointing protocol (Trainer, PEFT and 5.x's tests find these layers)
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:
    GradientCheckpointingLayer = None
TF_MAJOR = int(transformers.__version__.split(".")[0])


def tied_keys(head: str, embedding: str):
    """_tied_weights_keys of an LM whose `head`.weight may be tied to the parameter named `embedding`: 5.x names
    each tied weight's source; 4.x lists the tied keys."""
    return {f"{head}.weight": embedding} if TF_MAJOR >= 5 else [f"{head}.weight"]


def init_tensor(t: torch.Tensor, fn: str, **kw) -> None:
    """torch.nn.init's `fn` ("normal_", "zeros_", "ones_", ...) on `t`; in transformers 5.x its own guarded twin,
    which skips tensors it has loaded (4.x calls _init_weights only for modules with missing weights)."""
    try:
        from transformers import initialization as init
    except ImportError:
        init = torch.nn.init
    getattr(init, fn)(t, **kw)


def is_loaded(module: nn.Module) -> bool:
    """Whether transformers 5.x flagged one of the module's own tensors as loaded from the checkpoint."""
    return any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False))


class Names(nn.Module):
    """A transformers-named container: modules and tensors re-homed from megatrain (see the module docstring)."""


if GradientCheckpointingLayer is not None:
    class CheckpointingNames(Names, GradientCheckpointingLayer):
        """The transformers-named container of one megatrain block, as a GradientCheckpointingLayer: the block's
        forward runs through it (see as_checkpointing_layer), so transformers' checkpoint function, hooks on the
        layer and every_n_layers act on the layer transformers sees."""

        def forward(self, *args, **kwargs):
            return self._block_forward(*args, **kwargs)
else:
    CheckpointingNames = None

_CHECKPOINTING_CLASSES: dict = {}


def _checkpointing_class(cls: type) -> type:
    """`cls` with GradientCheckpointingLayer in front (same name: _no_split_modules and reprs keep it)."""
    if cls not in _CHECKPOINTING_CLASSES:
        _CHECKPOINTING_CLASSES[cls] = type(cls.__name__, (GradientCheckpointingLayer, cls),
                                           {"__module__": cls.__module__, "_megatrain_block": True})
    return _CHECKPOINTING_CLASSES[cls]


def as_checkpointing_layer(holder: nn.Module, block: nn.Module) -> Optional[nn.Module]:
    """Make the module at transformers' `layers.i` (`holder`) the GradientCheckpointingLayer through which
    megatrain's `block` runs. A block re-homed as itself (its names are transformers') gets the layer class in
    front of its own; under a transformers-named container, the block's forward calls the container, whose
    (checkpointed) forward is the block's own. Returns the layer (None without GradientCheckpointingLayer:
    transformers < 4.52)."""
    if GradientCheckpointingLayer is None:
        return None
    if holder is block:
        if not isinstance(block, GradientCheckpointingLayer):
            block.__class__ = _checkpointing_class(type(block))
        return block
    if not isinstance(holder, Names):
        raise RuntimeError("a megatrain block is expected as itself or under a transformers-named container (rehome)")
    if not isinstance(holder, CheckpointingNames):
        holder.__class__ = CheckpointingNames
        object.__setattr__(holder, "_block_forward", functools.partial(type(block).forward, block))
        block.forward = lambda *args, **kwargs: holder(*args, **kwargs)
    return holder


def rehome(hf_root: nn.Module, mt_root: nn.Module, hf_name: Callable[[str], str], skip: tuple = ()) -> list:
    """Register mt_root's modules/tensors under hf_root at hf_name(megatrain key) (the rule in the module
    docstring); `skip`: megatrain submodule names left out (re-homed elsewhere). Returns the bindings sync uses."""
    bindings = []

    def box(path: str) -> nn.Module:
        node = hf_root
        for part in path.split(".") if path else ():
            if node._modules.get(part) is None:
                node.add_module(part, Names())
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


def sync_bindings(bindings: list) -> None:
    for kind, mt_owner, mt_leaf, hf_owner, hf_leaf in bindings:
        table = {"module": "_modules", "p": "_parameters", "b": "_buffers"}[kind]
        src, dst = getattr(hf_owner, table), getattr(mt_owner, table)
        if dst.get(mt_leaf) is not src[hf_leaf]:
            dst[mt_leaf] = src[hf_leaf]


def default(value, config, name: str):
    return value if value is not None else getattr(config, name, False)


def wants_dict(return_dict, config) -> bool:
    if return_dict is not None:
        return return_dict
    return getattr(config, "use_return_dict", getattr(config, "return_dict", True))


def reorder_rows(obj, index: torch.Tensor):
    """Every tensor in `obj` (a cache dataclass, list or tuple of them, at any depth) with its rows (dim 0) picked
    by `index`, in place for dataclasses and lists; returns obj."""
    if torch.is_tensor(obj):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() else obj
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, reorder_rows(getattr(obj, f.name), index))
        return obj
    if isinstance(obj, list):
        obj[:] = [reorder_rows(v, index) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(reorder_rows(v, index) for v in obj)
    return obj


class MegatrainPreTrainedModel(PreTrainedModel):
    """The base of every exported class: holds the megatrain model (`_mt`, unregistered) re-homed here. Subclasses
    set `family`, `task`, config_class and base_model_prefix (the backbone's attribute), `backbone_class` (the
    family's bare-backbone class) and `build_megatrain(config)` -> the megatrain model of `task`."""

    family: str = ""
    task: str = ""
    backbone_class: type = None
    supports_gradient_checkpointing = True
    _is_stateful = True  # the families' carried states: no transformers key/value cache object

    def to_hf_key(self, key: str) -> str:
        """transformers' name of megatrain key `key` in this class (the one key map)."""
        return to_hf_key(key, self.task, self.family)

    def build(self, config, mt: nn.Module) -> None:
        """Hold megatrain model `mt` (unregistered) and re-home its modules here; its backbone (attribute
        base_model_prefix) as this family's bare-backbone class around it."""
        object.__setattr__(self, "_mt", mt)
        prefix = self.base_model_prefix
        setattr(self, prefix, self.backbone_class(config, backbone=getattr(mt, prefix), **self.backbone_kwargs()))
        self._bindings = rehome(self, mt, self.to_hf_key, skip=(prefix,))

    def backbone_kwargs(self) -> dict:
        return {}

    def backbone_model(self) -> "BackboneObserver":
        """The transformers bare-backbone model of this one (itself for the bare backbone)."""
        return self if isinstance(self, BackboneObserver) else getattr(self, self.base_model_prefix)

    def sync(self) -> None:
        backbone = self.backbone_model()
        if isinstance(backbone, MegatrainPreTrainedModel) and backbone is not self:
            backbone.sync()
        sync_bindings(self._bindings)
        if hasattr(self._mt, "tie_weights") and self._mt.config.tie_word_embeddings:
            self._mt.tie_weights()

    def megatrain(self):
        """The megatrain model, bound to this model's current modules and tensors."""
        self.sync()
        return self._mt

    def tensor_owners(self) -> dict:
        """(id(transformers holder), name) -> (megatrain module, name) for every re-homed tensor of this model."""
        cached = self.__dict__.get("_owners")
        if cached is None:
            cached = {(id(hf_owner), hf_leaf): (mt_owner, mt_leaf)
                      for m in self.modules() if isinstance(m, MegatrainPreTrainedModel)
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
        return self.backbone_model().get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone_model().set_input_embeddings(value)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        # each layer through transformers' checkpoint function (its gradient_checkpointing_kwargs apply; the layers
        # are GradientCheckpointingLayers), the pieces inside it nested through megatrain's own runner
        # (parallel/checkpointing.py, non-reentrant torch.utils.checkpoint), applied from outside the model as the
        # trainer applies it. Without GradientCheckpointingLayer (transformers < 4.52) megatrain's runner does all.
        from torch.utils.checkpoint import checkpoint
        func = gradient_checkpointing_func or functools.partial(checkpoint, use_reentrant=False)
        for m in self.modules():
            if isinstance(m, MegatrainPreTrainedModel):
                m.gradient_checkpointing = enable
        layers = [m for m in self.modules() if GradientCheckpointingLayer is not None
                  and isinstance(m, GradientCheckpointingLayer)]
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

    def observed(self, input_ids, inputs_embeds, output_hidden_states, output_attentions, call):
        """call(input_ids) under the backbone's hooks: (its result, the hidden states or None, the attentions or
        None)."""
        return self.backbone_model().observe(
            input_ids, inputs_embeds, default(output_hidden_states, self.config, "output_hidden_states"),
            default(output_attentions, self.config, "output_attentions"), call)

    @staticmethod
    def refuse_cross_attention(encoder_hidden_states=None) -> None:
        if encoder_hidden_states is not None:
            raise NotImplementedError("cross-attention (encoder_hidden_states) is not supported by megatrain's models")


class BackboneObserver:
    """The bare backbone's side (mixed into a family's XModel): records hidden states and attention probabilities
    during megatrain's forward and substitutes inputs_embeds. The family calls `observe_backbone(mt_backbone)` at
    construction after naming its hook points in `hidden_state_points(mt_backbone)`: one (module, "input" |
    "output") per hidden state, and `word_embedding(mt_backbone)`; `observe_attention(i, layer)` is the family's
    (the probabilities of its attention op)."""

    def hidden_state_points(self, backbone: nn.Module) -> list:
        raise NotImplementedError

    def observe_attention(self, index: int, layer: nn.Module) -> None:
        raise NotImplementedError

    def observe_backbone(self, backbone: nn.Module, word_embedding: nn.Module) -> None:
        self._hidden: Optional[list] = None
        self._attn: Optional[list] = None
        self._embeds: Optional[list] = None
        self._length = 0
        self._layers = list(backbone.layers)
        for index, (module, where) in enumerate(self.hidden_state_points(backbone)):
            if where == "input":
                module.register_forward_pre_hook(self._record_input(index))
            else:
                module.register_forward_hook(self._record_output(index))
        for i, layer in enumerate(self._layers):
            as_checkpointing_layer(self.get_submodule(f"layers.{i}"), layer)
            self.observe_attention(i, layer)
        word_embedding.register_forward_hook(self._substitute)

    def backbone_forward(self, call, output, input_ids, inputs_embeds, output_attentions, output_hidden_states,
                         return_dict, encoder_hidden_states):
        """The bare backbone's forward: call(input_ids) runs megatrain's backbone, output(its result, hidden states,
        attentions) makes transformers' output."""
        self.refuse_cross_attention(encoder_hidden_states)
        self.sync()
        res = output(*self.observed(input_ids, inputs_embeds, output_hidden_states, output_attentions, call))
        return res if wants_dict(return_dict, self.config) else res.to_tuple()

    def sync(self) -> None:  # the bare backbone's own bindings
        sync_bindings(self._bindings)

    def _keep(self, index: int, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Record hidden state `index` from t [B, L', D]; t with its real positions replaced by the recorded
        tensor where megatrain padded the input to whole chunks (a gradient reaches the returned hidden state,
        as in transformers' models: retain_grad works), else None (t itself was recorded)."""
        n = self._length
        if t.shape[1] > n:
            real = t[:, :n]
            self._hidden[index].append(real)
            return torch.cat([real, t[:, n:]], dim=1)
        self._hidden[index].append(t)
        return None

    def _record_output(self, index: int):
        def hook(module, args, output):
            if self._hidden is None:
                return None
            if torch.is_tensor(output):
                return self._keep(index, output)
            if isinstance(output, tuple) and output and torch.is_tensor(output[0]):  # (hidden, state)
                new = self._keep(index, output[0])
                return None if new is None else (new, *output[1:])
            return None
        return hook

    def _record_input(self, index: int):
        def hook(module, args):
            if self._hidden is None or not args or not torch.is_tensor(args[0]):
                return None
            new = self._keep(index, args[0])
            return None if new is None else (new, *args[1:])
        return hook

    def _substitute(self, module, args, output):
        if self._embeds is None:
            return None
        given, pos = self._embeds
        n = output.shape[1]
        take = given[:, pos:pos + n].to(output.dtype)
        self._embeds[1] = pos + take.shape[1]
        # positions past the given vectors are megatrain's chunk padding: keep the pad embedding there
        return torch.cat([take, output[:, take.shape[1]:]], dim=1)

    def observe(self, input_ids, inputs_embeds, hidden: bool, attentions: bool, call):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            input_ids = torch.full(inputs_embeds.shape[:2], pad, dtype=torch.long, device=inputs_embeds.device)
            self._embeds = [inputs_embeds, 0]
        n = len(self._layers)
        self._length = input_ids.shape[1]
        self._hidden = [[] for _ in range(n + 1)] if hidden else None
        self._attn = [[] for _ in range(n)] if attentions else None
        try:
            result = call(input_ids)
            states = probs = None
            if hidden:
                length = input_ids.shape[1]
                # one piece: the very tensor the next layer took (see _keep); a cached prompt that ran in two
                # pieces: joined
                states = tuple(torch.cat(parts, dim=1)[:, -length:] if len(parts) > 1 else parts[0]
                               for parts in self._hidden)
            if attentions:  # one entry per attention call (a cached prompt may run in two pieces: the last)
                probs = tuple(parts[-1] for parts in self._attn)
        finally:
            self._hidden, self._attn, self._embeds = None, None, None
        return result, states, probs

    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError


class CausalLMMixin:
    """The causal LM's transformers side (mixed in before the family's PreTrainedModel; GenerationMixin after it):
    the forward with labels / shift_labels / the cache, and generate's cache handling. The family provides
    `cache_class` and `call_lm(mt, input_ids, attention_mask, token_type_ids, **kw)`."""

    cache_class: type = None

    def call_lm(self, mt, input_ids, attention_mask, token_type_ids, **kw):
        return mt(input_ids, attention_mask, token_type_ids, **kw)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, encoder_hidden_states=None, shift_labels=None, **kwargs):
        self.refuse_cross_attention(encoder_hidden_states)
        cache = past_key_values if isinstance(past_key_values, self.cache_class) else None
        mt = self.megatrain()
        if cache is None and use_cache is True:
            # asked for explicitly (not from config.use_cache: a plain forward stays the one whole-sequence pass):
            # a fresh cache, filled by this forward and returned to continue from
            cache = mt.new_cache()
        # shift_labels (transformers 5.x: targets already aligned with the logits, as sequence-parallel trainers
        # pass them) are megatrain's labels_shifted; they take the place of labels
        target = labels if shift_labels is None else shift_labels
        out, states, probs = self.observed(
            input_ids, inputs_embeds, output_hidden_states, output_attentions,
            lambda ids: self.call_lm(mt, ids, attention_mask, token_type_ids, labels=target, cache=cache,
                                     labels_shifted=shift_labels is not None))
        res = CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=cache, hidden_states=states,
                                     attentions=probs)
        return res if wants_dict(return_dict, self.config) else res.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if not isinstance(past_key_values, self.cache_class):
            # the first step: the whole prompt (or its embeddings); a fresh cache the model fills
            first = {"input_ids": input_ids} if inputs_embeds is None or input_ids.shape[1] else {
                "inputs_embeds": inputs_embeds}
            return {**first, "attention_mask": attention_mask, "past_key_values": self.megatrain().new_cache()}
        new = input_ids[:, past_key_values.pos:] if input_ids.shape[1] > past_key_values.pos else input_ids[:, -1:]
        mask = None
        if attention_mask is not None:
            m = attention_mask[:, -new.shape[1]:]
            mask = None if bool(m.all()) else m
        return {"input_ids": new, "attention_mask": mask, "past_key_values": past_key_values}

    def _reorder_cache(self, past_key_values, beam_idx: torch.Tensor):
        # beam search: every per-row tensor of every layer follows its beam (states, current-chunk K/V/mask)
        return reorder_rows(past_key_values, beam_idx)
