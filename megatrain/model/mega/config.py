"""MegaConfig: the MEGA architecture settings, with transformers' field names, defaults and meaning.

Use:
    cfg = MegaConfig(vocab_size=8192, hidden_size=256, is_decoder=True, bidirectional=False)
    cfg.to_json_file("config.json"); cfg = MegaConfig.from_json_file("config.json")
    cfg = MegaConfig.from_dict(hf_config_json_dict)    # HF-generic keys (architectures, dtype...) are ignored

Every field of transformers 4.57.6 `MegaConfig` (transformers/models/deprecated/mega/configuration_mega.py in
that release; https://huggingface.co/docs/transformers/v4.57.1/en/model_doc/mega) is here with the same
default as transformers' *code* (note: `add_token_type_embeddings` defaults to False in the code, the docstring
says True). megatrain extras (tagged MEGATRAIN_ONLY in their field metadata; megatrain/hf derives what it
writes to and reads from a transformers config.json from the tags):
  gradient_checkpointing  the run's policy: the trainer applies activation checkpointing from outside when True
                          (megatrain/parallel/checkpointing.py: identical gradients, less activation memory);
                          the model itself never reads it (a plain model, e.g. exported remote code, runs plain)
  hf_rmsnorm_noop         reproduce transformers' MegaRMSNorm, which only multiplies by its weight (it computes
                          the normalization and throws it away). Set by `load_hf` for HF rmsnorm checkpoints so
                          they compute what they computed in transformers; new models keep False (a real RMSNorm).
  ema_block_size          block length of the blocked EMA (memory/speed knob only; results do not depend on it)
  kernel_backend          auto | torch | triton: which implementation the ops run (megatrain/ops/backend.py)
  segment_size            0 = off (default). S > 0: every layer runs the sequence in segments of S tokens (whole
                          chunks), the EMA state handed from segment to segment, each (layer, segment) its own
                          activation checkpoint: activation memory inside a layer is O(S), not O(L)
                          (megatrain/model/segments.py). Exact (fp rounding aside). Off by default because it needs
                          chunked attention and per-token norms (HF configs often have neither) and only pays off for
                          L >> S; long-context run configs set it (e.g. 16384).
Validation happens at construction and in `validate()`: a bad value raises ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from megatrain.model.settings import Settings
from megatrain.ops.backend import check_backend

NORMALIZATION_TYPES = ("scalenorm", "layernorm", "rmsnorm", "batchnorm", "syncbatchnorm")
ACTIVATIONS = ("silu", "relu", "linear", "gelu", "gelu_accurate")
ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
RELATIVE_POSITIONAL_BIASES = ("rotary", "simple")

# Field metadata key of the fields transformers' MegaConfig lacks, and its two values: KNOB = how the model is run
# (speed/memory only, the numbers do not depend on it: not part of an exported model), NUMERICS = changes the
# numbers (exported where it applies). megatrain_only_fields() lists them; the HF format derives its lists from it.
MEGATRAIN_ONLY = "megatrain_only"
KNOB = "knob"
NUMERICS = "numerics"

# Keys of a transformers config.json that describe the HF wrapper, generation defaults or bookkeeping, not the
# MEGA architecture: accepted and ignored by from_dict (anything else unknown is an error).
HF_GENERIC_KEYS = frozenset(
    """_name_or_path architectures auto_map bad_words_ids begin_suppress_tokens chunk_size_feed_forward
    cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample dtype torch_dtype early_stopping
    encoder_no_repeat_ngram_size exponential_decay_length_penalty finetuning_task forced_bos_token_id
    forced_eos_token_id id2label label2id length_penalty max_length min_length model_type no_repeat_ngram_size
    num_attention_heads num_beam_groups num_beams num_return_sequences output_attentions output_hidden_states
    output_scores prefix problem_type pruned_heads remove_invalid_values repetition_penalty return_dict
    return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss
    tie_encoder_decoder tokenizer_class top_k top_p torchscript transformers_version typical_p use_bfloat16
    is_encoder_decoder output_past xla_device use_return_dict""".split()
)


@dataclass
class MegaConfig(Settings):
    model_type: ClassVar[str] = "mega"     # the family (megatrain/model/registry.py); not a field
    vocab_size: int = 30522
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 256
    ema_projection_size: int = 16
    bidirectional: bool = True
    shared_representation_size: int = 64
    use_chunking: bool = False
    chunk_size: int = -1
    truncation: Optional[int] = None
    normalize_before_mega: bool = True
    normalization_type: str = "scalenorm"
    norm_affine: bool = True
    activation: str = "silu"
    attention_activation: str = "softmax"
    dropout_prob: float = 0.1
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    use_feature_dropout: bool = False
    use_normalized_ffn: bool = True
    nffn_hidden_size: int = 256
    normalize_before_ffn: bool = True
    nffn_activation_dropout_prob: float = 0.1
    max_positions: int = 2048
    add_token_type_embeddings: bool = False
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    ema_delta_alpha_range: float = 0.2
    ema_beta_range: float = 0.02
    ema_gamma_omega_range: float = 1.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    relative_positional_bias: str = "rotary"
    classifier_dropout: Optional[float] = None
    use_cache: bool = True
    add_lm_hidden_dense_layer: bool = True
    # PretrainedConfig fields that change the MEGA computation
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False
    # megatrain extras (see module docstring), tagged MEGATRAIN_ONLY: what transformers' config does not have
    gradient_checkpointing: bool = field(default=False, metadata={MEGATRAIN_ONLY: KNOB})
    hf_rmsnorm_noop: bool = field(default=False, metadata={MEGATRAIN_ONLY: NUMERICS})
    ema_block_size: int = field(default=128, metadata={MEGATRAIN_ONLY: KNOB})
    kernel_backend: str = field(default="auto", metadata={MEGATRAIN_ONLY: KNOB})
    segment_size: int = field(default=0, metadata={MEGATRAIN_ONLY: KNOB})

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> "MegaConfig":
        def bad(name, why):
            raise ValueError(f"MegaConfig.{name}={getattr(self, name)!r}: {why}")

        self.check_field_types(bad)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size",
                     "shared_representation_size", "nffn_hidden_size", "max_positions", "type_vocab_size",
                     "ema_block_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        for name in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "nffn_activation_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.normalization_type not in NORMALIZATION_TYPES:
            bad("normalization_type", f"unknown; choose one of {NORMALIZATION_TYPES}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"unknown; choose one of {ACTIVATIONS}")
        if self.attention_activation not in ATTENTION_ACTIVATIONS:
            bad("attention_activation", f"unknown; choose one of {ATTENTION_ACTIVATIONS}")
        if self.relative_positional_bias not in RELATIVE_POSITIONAL_BIASES:
            bad("relative_positional_bias", f"unknown; choose one of {RELATIVE_POSITIONAL_BIASES}")
        check_backend(self.kernel_backend)
        if self.use_chunking and self.chunk_size <= 0:
            bad("chunk_size", "must be > 0 when use_chunking=True")
        self.check_attention_span()
        self._check_segments(bad)
        if self.relative_positional_bias == "rotary" and self.shared_representation_size % 2:
            bad("shared_representation_size", "must be even for the rotary relative positional bias")
        if self.truncation is not None and self.truncation <= 0:
            bad("truncation", "must be None or > 0")
        if self.is_decoder and self.bidirectional:
            bad("bidirectional", "a bidirectional EMA sees the future: is_decoder=True needs bidirectional=False")
        if self.add_cross_attention:
            bad("add_cross_attention", "cross-attention (encoder-decoder MEGA) is not supported by megatrain")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"must be in [0, vocab_size={self.vocab_size})")
        if self.hf_rmsnorm_noop and self.normalization_type != "rmsnorm":
            bad("hf_rmsnorm_noop", "only meaningful with normalization_type='rmsnorm'")
        return self

    @staticmethod
    def state_carry_problem(use_chunking: bool, truncation: Optional[int],
                            normalization_type: str) -> Optional[tuple[str, str]]:
        """The one rule for running layers in pieces that hand the EMA state on (segment_size here, sequence
        parallelism in megatrain.parallel.sequence.validate_sp): (field, why) of the first field that breaks it,
        or None."""
        if not use_chunking:
            return "use_chunking", "attention must be chunk-local to stay inside a piece of whole chunks"
        if truncation is not None:
            return "truncation", "a truncated EMA has no finite state to hand from piece to piece (use None)"
        if normalization_type in ("batchnorm", "syncbatchnorm"):
            return "normalization_type", ("batch statistics would cover one piece, not the whole sequence (use "
                                          "scalenorm, layernorm or rmsnorm)")
        return None

    def _check_segments(self, bad) -> None:
        s = self.segment_size
        if s < 0:
            bad("segment_size", "must be >= 0 (0 = off)")
        if s == 0:
            return
        problem = self.state_carry_problem(self.use_chunking, self.truncation, self.normalization_type)
        if problem is not None:
            field, why = problem
            bad("segment_size", f"needs use_chunking=True ({why})" if field == "use_chunking" else
                f"cannot be used with {field}={getattr(self, field)!r}: {why}; or segment_size=0")
        if s % self.chunk_size:
            bad("segment_size", f"must be a multiple of chunk_size={self.chunk_size} (segments are whole chunks)")

    def check_attention_span(self, length: Optional[int] = None) -> None:
        """The one span rule: the simple relative bias table holds max_positions positions, and attention spans
        a chunk (use_chunking, or chunk_size when `length` is unknown) or the whole input of `length` tokens.
        ValueError naming the field if the span is longer."""
        if self.relative_positional_bias != "simple":
            return
        by_chunk = self.use_chunking or length is None
        span = self.chunk_size if by_chunk else length
        if span > self.max_positions:
            name = "chunk_size" if by_chunk else "max_positions"
            raise ValueError(f"MegaConfig.{name}={getattr(self, name)!r}: the attention span {span} exceeds the "
                             f"simple relative bias table (max_positions={self.max_positions})")

    # ---- (de)serialization ------------------------------------------------------------------------------------
    @classmethod
    def megatrain_only_fields(cls, kind: Optional[str] = None) -> tuple[str, ...]:
        """The fields tagged MEGATRAIN_ONLY (of one kind, KNOB or NUMERICS, if given), in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if MEGATRAIN_ONLY in f.metadata
                     and (kind is None or f.metadata[MEGATRAIN_ONLY] == kind))

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "MegaConfig":
        d = {**d, **overrides}
        if d.get("model_type", "mega") != "mega":
            raise ValueError(f"MegaConfig.from_dict: model_type={d['model_type']!r}, expected 'mega'")
        names = cls.field_names()
        unknown = sorted(k for k in d if k not in names and k not in HF_GENERIC_KEYS)
        if unknown:
            raise ValueError(f"MegaConfig: unknown field {unknown[0]!r} (all unknown: {unknown})")
        return cls(**{k: v for k, v in d.items() if k in names})
