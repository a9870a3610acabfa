"""MegalodonConfig: the Megalodon architecture settings (Ma et al. 2024, arXiv 2404.08801; reference code
github.com/XuezheMax/megalodon, whose ModelConf the fields follow, under MEGA's names where the meaning is MEGA's).

Use:
    cfg = MegalodonConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, chunk_size=256)
    cfg.to_json_file("config.json"); cfg = MegalodonConfig.from_json_file("config.json")
    cfg = MegalodonConfig.from_dict(d)         # unknown keys (a MEGA-only field, a typo) are an error naming the key

Fields and their reference-code names (ModelConf): hidden_size = model_dim, num_hidden_layers = num_layers,
num_attention_heads = num_heads, shared_representation_size = z_dim (Z, all heads), intermediate_size = value_dim
(E, all heads), nffn_hidden_size = ffn_hidden_dim, cema_ndim, chunk_size, norm_num_groups, norm_affine, norm_eps,
rope_base (None in the code means 1e4), swiglu, rescale_nffn, scale_embedding = scale_emb, tie_word_embeddings =
share_emb, dropout_prob = dropout, hidden_dropout_prob = hidden_dropout, attention_probs_dropout_prob =
attention_dropout, init_mode. megatrain's knobs (the numbers do not depend on them): gradient_checkpointing,
kernel_backend (auto | torch | triton, megatrain/ops/backend.py), segment_size (0 = off; S > 0: every layer runs in
segments of S tokens, whole chunks, the CEMA state and the timestep-norm statistics handed from segment to segment:
activation memory O(S) with checkpointing), ema_block_size (block length of the blocked complex EMA).

Megalodon is causal by design: the timestep norm's statistics and the complex EMA see only the past, so there is
no masked-LM variant (is_decoder must stay True; train.objective=mlm is refused naming model.is_decoder).
The fields generic run code reads of any family (use_chunking, truncation, normalization_type, bidirectional,
check_attention_span, state_carry_problem) are properties with Megalodon's fixed answers.
Validation happens at construction and in `validate()`: a bad value raises ValueError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatrain.model.settings import Settings
from megatrain.ops.backend import check_backend

INIT_MODES = ("he", "bert", "gaussian", "xavier")
# megatrain's knobs among the fields: how the model runs (speed, memory), never what it computes; an exported model
# (megatrain/hf) leaves them out
KNOBS = ("gradient_checkpointing", "kernel_backend", "segment_size", "ema_block_size")


@dataclass
class MegalodonConfig(Settings):
    model_type: str = "megalodon"          # the family (megatrain/model/registry.py); fixed
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 1
    shared_representation_size: int = 256
    intermediate_size: int = 2048
    nffn_hidden_size: int = 2560
    cema_ndim: int = 16
    chunk_size: int = 2048
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_embedding: bool = False
    tie_word_embeddings: bool = False
    dropout_prob: float = 0.0
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    init_mode: str = "he"
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    is_decoder: bool = True
    # megatrain knobs (KNOBS; see the module docstring)
    gradient_checkpointing: bool = False
    kernel_backend: str = "auto"
    segment_size: int = 0
    ema_block_size: int = 128

    def __post_init__(self):
        self.validate()

    # ---- what generic run code asks any family (fixed answers for Megalodon) ----------------------------------
    use_chunking = property(lambda self: True, doc="attention is always within chunks of chunk_size")
    truncation = property(lambda self: None, doc="the complex EMA is never truncated")
    normalization_type = property(lambda self: "timestep", doc="the sequence norm: timestep normalization")
    bidirectional = property(lambda self: False, doc="causal by design")

    def check_attention_span(self, length: Optional[int] = None) -> None:
        """Nothing to check: RoPE inside a chunk has no position table."""

    @staticmethod
    def state_carry_problem(*_args) -> Optional[tuple[str, str]]:
        """Megalodon's layers always hand their state on exactly (chunked attention, carried statistics)."""
        return None

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> "MegalodonConfig":
        def bad(name, why):
            raise ValueError(f"MegalodonConfig.{name}={getattr(self, name)!r}: {why}")

        self.check_field_types(bad)
        if self.model_type != "megalodon":
            bad("model_type", "must be 'megalodon' (MEGA's settings are MegaConfig)")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "shared_representation_size", "intermediate_size", "nffn_hidden_size", "cema_ndim",
                     "chunk_size", "norm_num_groups", "ema_block_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        for name in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if not self.norm_eps > 0:
            bad("norm_eps", "must be > 0")
        if not self.rope_base > 1:
            bad("rope_base", "must be > 1")
        if self.hidden_size % self.norm_num_groups:
            bad("norm_num_groups", f"must divide hidden_size={self.hidden_size} (groups of equal size)")
        for name in ("shared_representation_size", "intermediate_size"):
            if getattr(self, name) % self.num_attention_heads:
                bad(name, f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        if (self.shared_representation_size // self.num_attention_heads) % 2:
            bad("shared_representation_size", "the per-head size must be even (RoPE rotates feature pairs)")
        if self.init_mode not in INIT_MODES:
            bad("init_mode", f"unknown; choose one of {INIT_MODES}")
        if not self.is_decoder:
            bad("is_decoder", "Megalodon is causal (its timestep norm and complex EMA see only the past): a masked "
                              "LM is not possible; use train.objective=clm")
        check_backend(self.kernel_backend)
        if self.segment_size < 0:
            bad("segment_size", "must be >= 0 (0 = off)")
        if self.segment_size and self.segment_size % self.chunk_size:
            bad("segment_size", f"must be a multiple of chunk_size={self.chunk_size} (segments are whole chunks)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"must be in [0, vocab_size={self.vocab_size})")
        return self

    # ---- (de)serialization ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "MegalodonConfig":
        d = {**d, **overrides}
        if d.get("model_type", "megalodon") != "megalodon":
            raise ValueError(f"MegalodonConfig.from_dict: model_type={d['model_type']!r}, expected 'megalodon'")
        unknown = sorted(k for k in d if k not in cls.field_names())
        if unknown:
            raise ValueError(f"MegalodonConfig: unknown field {unknown[0]!r} (all unknown: {unknown})")
        return cls(**d)



# the reference code's model store (megalodon/model/mega.py ModelStore) as configs: 200M, 1.3B, 7B
REFERENCE_SIZES = {
    "200M": dict(num_hidden_layers=12, hidden_size=1024, num_attention_heads=1, shared_representation_size=256,
                 intermediate_size=2048, nffn_hidden_size=2560, chunk_size=2048, norm_num_groups=32),
    "1.3B": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=2, shared_representation_size=512,
                 intermediate_size=4096, nffn_hidden_size=4864, chunk_size=2048, norm_num_groups=64),
    "7B": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=4, shared_representation_size=1024,
               intermediate_size=8192, nffn_hidden_size=11264, chunk_size=2048, norm_num_groups=64),
}
