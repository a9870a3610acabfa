"""The bake-off's architectures: name -> how to build a causal LM of a preset's size (bench/bakeoff.py uses it).

    from bench.bakeoff_archs import ARCHS, build_arch, non_embedding_params
    model, info = build_arch("llama", shape, vocab_size=2048, match=mega_non_embedding)
    # info: {"config": {...}, "params": N, "non_embedding_params": N', "flops_per_token": F}

Every model answers megatrain's keyword LM API (megatrain/model/lm.py): megatrain's own models directly, a
transformers model through megatrain.hf.causal_lm.CausalLMAdapter. An entry is a function
(shape, vocab_size, overrides, match) -> (model, config dict, (layers, attention span, qk dim, v dim) for the
FLOPs convention of megatrain.train.metrics.model_flops_per_token).
``shape`` is the preset's MEGA shape (bench/bakeoff.py PRESETS); ``match`` the non-embedding parameter count a
baseline is sized to (None for the reference arch, MEGA). Adding an arch = one function + one ARCHS line (Megalodon:
megatrain.model.build_model with model_type "megalodon", its FFN width sized to MEGA's count).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from megatrain.train.metrics import model_flops_per_token

REFERENCE = "mega"   # the arch whose non-embedding parameter count the others match (within MATCH_TOLERANCE)
MATCH_TOLERANCE = 0.05


def non_embedding_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) unique parameters; non-embedding leaves out the [V, D] token embedding and an
    untied output head of the same shape."""
    emb = model.get_input_embeddings().weight
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    drop = {id(emb)}
    # a transformers model names its head; megatrain's LMs (either family) call it lm_head
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if head is not None and head.weight.shape == emb.shape:
        drop.add(id(head.weight))
    return total, total - sum(params[i].numel() for i in drop if i in params)


def _mega(shape: dict, vocab_size: int, overrides: dict, match: Optional[int]):
    # ModelCfg: the model section of a run config, i.e. megatrain's run defaults (what a user's config gets)
    from megatrain.config import ModelCfg
    from megatrain.model import build_model
    cfg = dict(vocab_size=vocab_size, is_decoder=True, bidirectional=False, use_chunking=True,
               dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               nffn_activation_dropout_prob=0.0, pad_token_id=3, bos_token_id=1, eos_token_id=2,
               max_positions=shape["chunk_size"], **{k: shape[k] for k in MEGA_SHAPE_KEYS})
    cfg.update(overrides)
    config = ModelCfg(**cfg)
    model = build_model(config)
    return model, config.to_dict(), (config.num_hidden_layers, config.chunk_size,
                                     config.shared_representation_size, config.intermediate_size)


MEGA_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "shared_representation_size",
                   "nffn_hidden_size", "ema_projection_size", "chunk_size")


def llama_non_embedding(d: int, layers: int, ffn: int, kv_ratio: int = 1) -> int:
    """Non-embedding parameters of a transformers Llama (no biases, tied head): per layer q, o (d x d), k, v
    (d x d / kv_ratio), gate/up/down (3 x d x ffn), two RMSNorm weights; plus the final norm."""
    return layers * (2 * d * d + 2 * d * d // kv_ratio + 3 * d * ffn + 2 * d) + d


def llama_shape(target: int, d: int, layers: int, head_dim: int = 32) -> dict:
    """The Llama of width d and depth `layers` whose non-embedding count is closest to `target` (FFN width a
    multiple of 8); ValueError when none is within MATCH_TOLERANCE."""
    attn = llama_non_embedding(d, layers, 0)
    ffn = max(8, round((target - attn) / (3 * d * layers) / 8) * 8)
    got = llama_non_embedding(d, layers, ffn)
    if abs(got - target) > MATCH_TOLERANCE * target:
        raise ValueError(f"no Llama of width {d} and {layers} layers within {MATCH_TOLERANCE:.0%} of {target} "
                         f"non-embedding parameters (closest: {got})")
    return {"hidden_size": d, "num_hidden_layers": layers, "intermediate_size": ffn,
            "num_attention_heads": max(1, d // head_dim), "num_key_value_heads": max(1, d // head_dim)}


def _llama(shape: dict, vocab_size: int, overrides: dict, match: Optional[int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatrain.hf.causal_lm import CausalLMAdapter
    if match is None:
        raise ValueError("llama is a baseline: it is sized to the reference arch's non-embedding parameters")
    size = llama_shape(match, shape["hidden_size"], shape["num_hidden_layers"], shape.get("head_dim", 32))
    cfg = dict(vocab_size=vocab_size, max_position_embeddings=shape["max_positions"], rope_theta=10000.0,
               tie_word_embeddings=True, attention_dropout=0.0, pad_token_id=3, bos_token_id=1, eos_token_id=2,
               attn_implementation="sdpa", **size)
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    model = CausalLMAdapter(LlamaForCausalLM(config))
    d = config.hidden_size
    return model, config.to_dict(), (config.num_hidden_layers, shape["train_len"], d, d)


def _megalodon_config(shape: dict, vocab_size: int, overrides: dict, ffn: int):
    from megatrain.model.megalodon.config import MegalodonConfig
    d = shape["hidden_size"]
    # the reference's proportions: v = the MEGA shape's intermediate width, z its shared width, one head below
    # width 2048, timestep-norm groups of 32 channels (32 groups at d 1024, as the 200M)
    cfg = dict(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=shape["num_hidden_layers"],
               num_attention_heads=1 if d < 2048 else 2, shared_representation_size=shape["shared_representation_size"],
               intermediate_size=shape["intermediate_size"], nffn_hidden_size=ffn,
               cema_ndim=shape["ema_projection_size"], chunk_size=shape["chunk_size"],
               norm_num_groups=max(1, d // 32), pad_token_id=3, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return MegalodonConfig(**cfg)


def _megalodon(shape: dict, vocab_size: int, overrides: dict, match: Optional[int]):
    """Megalodon (megatrain.model.build_model, model_type megalodon) at the MEGA shape's width, depth, z, v, EMA
    dim and chunk, its FFN width chosen (a multiple of 8) so its non-embedding parameters match MEGA's; its own
    reference init ("he") and untied head (left out of the count as the Llama's tied one is)."""
    from megatrain.model import build_model
    if match is None:
        raise ValueError("megalodon is compared with the reference arch: it is sized to its non-embedding parameters")
    if "nffn_hidden_size" in overrides:
        ffn = overrides["nffn_hidden_size"]
    else:  # non-embedding parameters are linear in the FFN width: two probes give the line
        probe = [non_embedding_params(build_model(_megalodon_config(shape, vocab_size, overrides, f)))[1]
                 for f in (8, 16)]
        slope = (probe[1] - probe[0]) / 8
        ffn = max(8, round((match - (probe[0] - 8 * slope)) / slope / 8) * 8)
    config = _megalodon_config(shape, vocab_size, overrides, ffn)
    model = build_model(config)
    return model, config.to_dict(), (config.num_hidden_layers, config.chunk_size,
                                     config.shared_representation_size, config.intermediate_size)


ARCHS = {"mega": _mega, "llama": _llama, "megalodon": _megalodon}


def build_arch(name: str, shape: dict, vocab_size: int, overrides: Optional[dict] = None,
               match: Optional[int] = None):
    """(model, info) of arch `name` (see the module docstring); the caller seeds torch before."""
    if name not in ARCHS:
        raise ValueError(f"--archs: unknown arch {name!r}; known: {', '.join(ARCHS)}")
    model, config, (layers, span, qk, v) = ARCHS[name](shape, vocab_size, dict(overrides or {}), match)
    total, non_emb = non_embedding_params(model)
    if match is not None and abs(non_emb - match) > MATCH_TOLERANCE * match:
        raise ValueError(f"{name}: {non_emb} non-embedding parameters, not within {MATCH_TOLERANCE:.0%} of "
                         f"{REFERENCE}'s {match}")
    flops = model_flops_per_token(total, layers, span, qk, v, causal=True)
    return model, {"config": config, "params": total, "non_embedding_params": non_emb, "flops_per_token": flops}
