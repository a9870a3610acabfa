"""MegaConfig: transformers' field names and defaults, JSON round trip, one clear error per bad field.

Run: PYTHONPATH=. python -m pytest -q tests/model/test_config.py
"""
import inspect
import json

import pytest

from megatrain.model import MegaConfig


def test_fields_and_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MegaConfig()
    params = inspect.signature(transformers.MegaConfig.__init__).parameters
    ours = MegaConfig()
    hf_fields = [p for p in params if p not in ("self", "kwargs")]
    assert len(hf_fields) == 37
    for name in hf_fields:
        assert getattr(ours, name) == getattr(hf, name), name
    for name in ("is_decoder", "tie_word_embeddings", "add_cross_attention"):  # PretrainedConfig fields we use
        assert getattr(ours, name) == getattr(hf, name), name


def test_json_round_trip_and_hf_config_dict(tmp_path):
    cfg = MegaConfig(vocab_size=99, hidden_size=32, use_chunking=True, chunk_size=16, truncation=7,
                     is_decoder=True, bidirectional=False, gradient_checkpointing=True)
    cfg.to_json_file(tmp_path / "c.json")
    assert MegaConfig.from_json_file(tmp_path / "c.json") == cfg
    assert MegaConfig.from_dict(cfg.to_dict()) == cfg
    transformers = pytest.importorskip("transformers")
    hf_dict = transformers.MegaConfig(vocab_size=99, hidden_size=32, is_decoder=True, bidirectional=False).to_dict()
    hf_dict["architectures"] = ["MegaForCausalLM"]
    loaded = MegaConfig.from_dict(hf_dict)  # HF bookkeeping keys are accepted and ignored
    assert loaded.vocab_size == 99 and loaded.is_decoder and not loaded.bidirectional


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(use_chunking=True, chunk_size=0), "chunk_size"),
        (dict(use_chunking=True, chunk_size=-1), "chunk_size"),
        (dict(is_decoder=True, bidirectional=True), "bidirectional"),
        (dict(normalization_type="groupnorm"), "normalization_type"),
        (dict(activation="swish"), "activation"),
        (dict(attention_activation="sigmoid"), "attention_activation"),
        (dict(relative_positional_bias="alibi"), "relative_positional_bias"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=16.0), "hidden_size"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(dropout_prob=1.0), "dropout_prob"),
        (dict(truncation=0), "truncation"),
        (dict(use_chunking="yes"), "use_chunking"),
        (dict(shared_representation_size=7), "shared_representation_size"),
        (dict(relative_positional_bias="simple", chunk_size=4096), "chunk_size"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(pad_token_id=30522), "pad_token_id"),
        (dict(hf_rmsnorm_noop=True), "hf_rmsnorm_noop"),
    ],
)
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"MegaConfig\.{field}="):
        MegaConfig(**kw)


def test_unknown_field_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown field 'hiden_size'"):
        MegaConfig.from_dict({"hiden_size": 8})
    with pytest.raises(TypeError):
        MegaConfig(hiden_size=8)
    with pytest.raises(ValueError, match="model_type"):
        MegaConfig.from_dict({"model_type": "bert"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        MegaConfig.from_json_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="JSON object"):
        MegaConfig.from_json_file(tmp_path / "list.json")


def test_validate_catches_later_edits():
    cfg = MegaConfig()
    cfg.chunk_size = 0
    cfg.use_chunking = True
    with pytest.raises(ValueError, match="chunk_size"):
        cfg.validate()
