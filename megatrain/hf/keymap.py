"""The one megatrain <-> transformers key map, for every model family (imports no model code: each family's exported
remote code ships it).

    from megatrain.hf.keymap import to_hf_key, to_hf_state_dict, from_hf_state_dict
    to_hf_key("mega.layers.0.attn.ema.alpha", "causal")               # 'mega.layers.0.mega_layer.ema_gate.alpha'
    to_hf_key("megalodon.layers.0.attn.wz.weight", "causal", "megalodon")  # the same name (see below)
    hf_sd = to_hf_state_dict(model.state_dict(), "causal", "megalodon")
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_parity.py tests/hf/test_megalodon_export.py

Each family has one table of (megatrain pattern, transformers pattern) rules, read left-to-right on save and
right-to-left on load; the first whole-key match wins. {i} = a layer index, {leaf} = the rest of the key, {head} =
the task's vocabulary head (lm_head | mlm_head). The bare backbone (transformers' XModel, task "backbone") is the
LMs' backbone subtree at the root: the same table with the family's backbone prefix ("mega." / "megalodon.")
removed.

- mega: transformers 4.57's MEGA names (its native classes load megatrain's exports; megatrain loads theirs).
- megalodon: no transformers class existed before megatrain's export, so its names are megatrain's own (the
  backbone under `megalodon.`, the head `lm_head`, base_model_prefix "megalodon"): the table is the identity,
  written as rules so that the mechanism, the backbone rule and the checks are the one above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KeyMap:
    family: str
    prefix: str                     # the backbone's module name in the LMs and heads
    embedding: str                  # megatrain's key of the word embedding (a tied head's weight)
    rules: tuple                    # (megatrain pattern, transformers pattern)
    heads: dict = field(default_factory=dict)   # task -> the vocabulary head's transformers name
    # transformers buffers megatrain has no tensor for: dropped on load, written as zeros on save where present
    dummies: tuple = ()


KEY_MAPS = {
    "mega": KeyMap("mega", "mega", "mega.embeddings.word_embeddings.weight", (
        ("mega.embeddings.word_embeddings.weight", "mega.embedding_layer.word_embeddings.weight"),
        ("mega.embeddings.token_type_embeddings.weight", "mega.embedding_layer.token_type_embeddings.weight"),
        ("mega.layers.{i}.attn.norm.{leaf}", "mega.layers.{i}.mega_layer.norm.norm.{leaf}"),
        ("mega.layers.{i}.attn.ema.{leaf}", "mega.layers.{i}.mega_layer.ema_gate.{leaf}"),
        ("mega.layers.{i}.attn.rel_pos.alpha", "mega.layers.{i}.mega_layer.rel_pos_bias.alpha"),
        ("mega.layers.{i}.attn.rel_pos.beta", "mega.layers.{i}.mega_layer.rel_pos_bias.b_param"),
        ("mega.layers.{i}.attn.rel_pos.weight", "mega.layers.{i}.mega_layer.rel_pos_bias.rel_pos_bias"),
        ("mega.layers.{i}.attn.{leaf}", "mega.layers.{i}.mega_layer.{leaf}"),
        ("mega.layers.{i}.ffn.norm.{leaf}", "mega.layers.{i}.nffn.norm.norm.{leaf}"),
        ("mega.layers.{i}.ffn.{leaf}", "mega.layers.{i}.nffn.{leaf}"),
        ("dense.{leaf}", "dense.{leaf}"),
        ("lm_head.{leaf}", "{head}.{leaf}"),
        # the downstream heads (megatrain/model/mega/heads.py): same module names, except the pooler of multiple
        # choice, which transformers keeps inside its backbone
        ("classifier.{leaf}", "classifier.{leaf}"),
        ("qa_outputs.{leaf}", "qa_outputs.{leaf}"),
        ("pooler.{leaf}", "mega.pooler.{leaf}"),
    ), heads={"causal": "lm_head", "masked": "mlm_head"},
        # transformers' rotary bias registers a persistent dummy buffer (used only for its device/dtype)
        dummies=("mega.layers.{i}.mega_layer.rel_pos_bias._float_tensor",)),
    "megalodon": KeyMap("megalodon", "megalodon", "megalodon.embed.weight", (
        ("megalodon.{leaf}", "megalodon.{leaf}"),
        ("lm_head.{leaf}", "{head}.{leaf}"),
    ), heads={"causal": "lm_head"}),
}
FAMILIES = tuple(KEY_MAPS)


def key_map(family: str) -> KeyMap:
    if family not in KEY_MAPS:
        raise ValueError(f"no transformers key map for model family {family!r} (known: {', '.join(FAMILIES)})")
    return KEY_MAPS[family]


def compile_pattern(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{leaf\}", r"(?P<leaf>[A-Za-z_][\w.]*)")
    return re.compile(rx + r"\Z")


def rename(key: str, task: str, to_hf: bool, family: str = "mega") -> str:
    """The other side's name of `key` (a megatrain key if to_hf, else a transformers key) in a `task` model."""
    km = key_map(family)
    p = km.prefix + "."
    if task == "backbone":
        # the bare backbone is the LMs' backbone subtree at the root: the same table without a vocabulary head
        return (rename(key, "", True, family).removeprefix(p) if to_hf else rename(p + key, "", False, family))
    for ours, theirs in km.rules:
        if "{head}" in theirs:
            if task not in km.heads:
                continue
            theirs = theirs.replace("{head}", km.heads[task])
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        m = compile_pattern(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    side = "megatrain" if to_hf else "transformers"
    raise ValueError(f"no key-map rule for {side} key {key!r} ({family})")


def to_hf_key(key: str, task: str, family: str = "mega") -> str:
    """transformers' name of the megatrain parameter/buffer `key` of a `task` model (the remote code uses it)."""
    return rename(key, task, True, family)


def is_dummy(hf_key: str, task: str, family: str = "mega") -> bool:
    km = key_map(family)
    full = km.prefix + "." + hf_key if task == "backbone" else hf_key
    return any(compile_pattern(d).match(full) for d in km.dummies)


def from_hf_state_dict(sd: dict, task: str, family: str = "mega") -> dict:
    """A transformers state dict under megatrain's names (dummy buffers dropped)."""
    return {rename(k, task, False, family): v for k, v in sd.items() if not is_dummy(k, task, family)}


def to_hf_state_dict(sd: dict, task: str, family: str = "mega", dummy_layers: int = 0) -> dict:
    """A megatrain state dict under transformers' names; the family's dummy buffers written (as 0.0) for layers
    0..dummy_layers-1."""
    km = key_map(family)
    out = {rename(k, task, True, family): v for k, v in sd.items()}
    for pattern in km.dummies:
        for i in range(dummy_layers):
            key = pattern.format(i=i)
            out[key.removeprefix(km.prefix + ".") if task == "backbone" else key] = torch.zeros(1)
    return out
