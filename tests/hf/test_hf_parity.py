"""megatrain MEGA == transformers 4.57.6 MEGA, both directions, over a matrix of configs covering every option.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_parity.py

For every config: an HF model with weights far from init -> save_pretrained -> load_hf: logits equal HF's
(<= 1e-5, fp32, eval), with and without right padding; then save_hf -> transformers from_pretrained: same logits;
then the state dict round trips bitwise (ours -> HF -> ours, and HF -> ours -> HF).
"""
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MegaConfig as HFMegaConfig  # noqa: E402
from transformers import MegaForCausalLM as HFMegaForCausalLM  # noqa: E402
from transformers import MegaForMaskedLM as HFMegaForMaskedLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from megatrain.hf.format import (  # noqa: E402
    KEY_TABLE, REMOTE_ONLY_MODEL_TYPE, hf_to_megatrain_state_dict, load_hf, megatrain_to_hf_state_dict,
    native_problem, save_hf)
from megatrain.model import MegaForCausalLM, MegaForMaskedLM  # noqa: E402
from tests.model.util import TINY, ids, randomize_, tiny_config  # noqa: E402

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*GenerationMixin.*")
pytestmark = pytest.mark.filterwarnings("ignore:dropout2d")  # transformers' feature dropout on a 3-D input
TOL = 1e-5

# name -> (causal, config overrides, sequence length). L is a multiple of chunk_size where chunking (HF needs it).
MATRIX = {
    "causal_base": (True, {}, 12),
    "masked_base": (False, {}, 12),
    "causal_chunk_laplace": (True, dict(use_chunking=True, chunk_size=4, attention_activation="laplace"), 16),
    "causal_chunk_relu2_simple": (True, dict(use_chunking=True, chunk_size=4, attention_activation="relu2",
                                             relative_positional_bias="simple"), 16),
    "masked_chunk_softmax": (False, dict(use_chunking=True, chunk_size=4), 16),
    "masked_chunk_laplace_simple": (False, dict(use_chunking=True, chunk_size=8, attention_activation="laplace",
                                                relative_positional_bias="simple"), 16),
    "causal_simple_nochunk": (True, dict(relative_positional_bias="simple"), 12),
    "masked_layernorm_gelu": (False, dict(normalization_type="layernorm", activation="gelu"), 12),
    # (layernorm + norm_affine=False crashes transformers' _init_weights; megatrain's is tested in tests/model)
    "causal_batchnorm_noaffine": (True, dict(normalization_type="batchnorm", norm_affine=False), 12),
    "masked_rmsnorm_hf": (False, dict(normalization_type="rmsnorm"), 12),
    "causal_batchnorm_relu": (True, dict(normalization_type="batchnorm", activation="relu"), 12),
    "masked_syncbatchnorm_linear": (False, dict(normalization_type="syncbatchnorm", activation="linear"), 12),
    "causal_scalenorm_noaffine_gelu_acc": (True, dict(norm_affine=False, activation="gelu_accurate"), 12),
    "masked_truncation": (False, dict(truncation=5), 12),
    "causal_truncation_chunk": (True, dict(truncation=3, use_chunking=True, chunk_size=4), 12),
    "causal_postnorm": (True, dict(normalize_before_mega=False, normalize_before_ffn=False), 12),
    "masked_postnorm_layernorm": (False, dict(normalize_before_mega=False, normalize_before_ffn=False,
                                              normalization_type="layernorm"), 12),
    "causal_no_nffn_feature_dropout": (True, dict(use_normalized_ffn=False, use_feature_dropout=True,
                                                  dropout_prob=0.3, hidden_dropout_prob=0.2,
                                                  attention_probs_dropout_prob=0.1,
                                                  nffn_activation_dropout_prob=0.2), 12),
    "masked_token_types": (False, dict(add_token_type_embeddings=True, type_vocab_size=3), 12),
    "causal_token_types_untied": (True, dict(add_token_type_embeddings=True, tie_word_embeddings=False), 12),
    "masked_no_lm_dense_untied": (False, dict(add_lm_hidden_dense_layer=False, tie_word_embeddings=False), 12),
    "causal_no_lm_dense": (True, dict(add_lm_hidden_dense_layer=False), 12),
    "masked_simple_chunksize_set": (False, dict(relative_positional_bias="simple", chunk_size=16), 12),
}


def _hf_model(causal, overrides, tmp_path):
    cfg = tiny_config(causal, **overrides)
    hf_kw = {k: v for k, v in cfg.to_dict().items()
             if k not in ("gradient_checkpointing", "hf_rmsnorm_noop", "ema_block_size")}
    hf_cfg = HFMegaConfig(**hf_kw)
    cls = HFMegaForCausalLM if causal else HFMegaForMaskedLM
    torch.manual_seed(0)
    model = randomize_(cls(hf_cfg))
    model.save_pretrained(tmp_path / "hf")
    # a fresh load: HF caches EMA kernels in eval mode, so never reuse a model whose weights were edited
    return cls, cls.from_pretrained(tmp_path / "hf").eval()


def _inputs(causal, overrides, length):
    x = ids(2, length, seed=1)
    mask = torch.ones_like(x)
    mask[1, length - 5:] = 0  # right padding on row 1
    x[1, length - 5:] = 1
    tt = None
    if overrides.get("add_token_type_embeddings"):
        tt = torch.randint(0, overrides.get("type_vocab_size", 2), x.shape, generator=torch.Generator().manual_seed(2))
    return x, mask, tt


def _max_diff(a, b, mask=None):
    if mask is not None:
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_parity_both_directions(name, tmp_path):
    causal, overrides, length = MATRIX[name]
    cls, hf = _hf_model(causal, overrides, tmp_path)
    ours = load_hf(tmp_path / "hf")
    assert isinstance(ours, MegaForCausalLM if causal else MegaForMaskedLM)
    assert not ours.training
    x, mask, tt = _inputs(causal, overrides, length)
    labels = ids(2, length, seed=3)
    # transformers' causal LM takes its incremental-EMA path when use_cache=True (its default without labels),
    # and that path ignores `truncation`: compare against its full path
    kw = dict(use_cache=False) if causal else {}
    with torch.no_grad():
        h_full = hf(x, token_type_ids=tt, labels=labels)
        o_full = ours(x, token_type_ids=tt, labels=labels)
        h_pad = hf(x, attention_mask=mask, token_type_ids=tt, **kw).logits
        o_pad = ours(x, attention_mask=mask, token_type_ids=tt).logits
    assert h_full.logits.abs().max() > 1e-2  # the comparison is not between near-zero tensors
    assert _max_diff(h_full.logits, o_full.logits) <= TOL
    assert abs(h_full.loss.item() - o_full.loss.item()) <= TOL
    assert _max_diff(h_pad, o_pad, mask) <= TOL
    # padding changes real positions in a bidirectional model (checks the mask reaches the computation)
    if not causal:
        assert _max_diff(o_full.logits, o_pad, mask) > 1e-4

    # megatrain -> HF
    if native_problem(ours.config):
        # transformers' default (cached) causal forward drops truncation: no native export, the remote one only
        with pytest.raises(ValueError, match="truncation"):
            save_hf(ours, tmp_path / "ours")
        save_hf(ours, tmp_path / "ours", native=False)
        assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == REMOTE_ONLY_MODEL_TYPE
        kw = dict(use_cache=False)
        hf2 = cls.from_pretrained(tmp_path / "ours").eval()  # explicit class: its full path is still exact
    else:
        save_hf(ours, tmp_path / "ours")
        hf2 = None
    cfg_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg_json["model_type"] == ("mega" if hf2 is None else REMOTE_ONLY_MODEL_TYPE)
    assert cfg_json["architectures"] == [cls.__name__]
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    hf2 = hf2 if hf2 is not None else auto.from_pretrained(tmp_path / "ours").eval()
    assert type(hf2) is cls
    with torch.no_grad():
        assert _max_diff(hf2(x, token_type_ids=tt, **kw).logits, o_full.logits) <= TOL
        assert _max_diff(hf2(x, attention_mask=mask, token_type_ids=tt, **kw).logits, o_pad, mask) <= TOL

    # state dicts round trip bitwise
    back = load_hf(tmp_path / "ours")
    sd0, sd1 = ours.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    task = "causal" if causal else "masked"
    hf_sd = {k: v for k, v in hf.state_dict().items()}
    again = megatrain_to_hf_state_dict(hf_to_megatrain_state_dict(hf_sd, task), task, ours.config)
    assert again.keys() == hf_sd.keys()
    for k in hf_sd:
        assert torch.equal(hf_sd[k], again[k]), k


def test_matrix_covers_every_option():
    seen = {}
    for causal, overrides, _ in MATRIX.values():
        seen.setdefault("is_decoder", set()).add(causal)
        for k, v in overrides.items():
            seen.setdefault(k, set()).add(v)
    assert len(MATRIX) >= 16
    assert seen["normalization_type"] >= {"layernorm", "rmsnorm", "batchnorm", "syncbatchnorm"}  # + scalenorm default
    assert seen["activation"] >= {"relu", "linear", "gelu", "gelu_accurate"}  # + silu default
    assert seen["attention_activation"] >= {"laplace", "relu2"}  # + softmax default
    assert seen["relative_positional_bias"] == {"simple"}  # + rotary default
    for opt in ("use_chunking", "truncation", "normalize_before_mega", "norm_affine", "use_feature_dropout",
                "use_normalized_ffn", "normalize_before_ffn", "add_token_type_embeddings",
                "add_lm_hidden_dense_layer", "tie_word_embeddings", "dropout_prob", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "nffn_activation_dropout_prob"):
        assert opt in seen, opt


def test_save_hf_refuses_real_rmsnorm(tmp_path):
    model = MegaForMaskedLM(tiny_config(False, normalization_type="rmsnorm"))
    with pytest.raises(ValueError, match="rmsnorm"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_load_hf_reads_pytorch_model_bin_and_task_override(tmp_path):
    cls, hf = _hf_model(True, {}, tmp_path)
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    cfg = json.loads((tmp_path / "bin" / "config.json").read_text())
    cfg.pop("architectures")  # fall back to is_decoder
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(tmp_path / "bin")
    assert isinstance(ours, MegaForCausalLM)
    x = ids(2, 10)
    with torch.no_grad():
        assert _max_diff(hf(x).logits, ours(x).logits) <= TOL
    with pytest.raises(ValueError, match="is_decoder"):
        load_hf(tmp_path / "bin", task="masked")


def test_load_hf_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path)
    cls, hf = _hf_model(True, {}, tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["hidden_size"] = 32  # weights no longer fit the config
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_hf(tmp_path / "hf")
    cfg["hidden_size"] = TINY["hidden_size"]
    cfg["my_new_option"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="my_new_option"):
        load_hf(tmp_path / "hf")


def test_key_table_is_one_bijective_map():
    # every megatrain key of a maximal model maps to a distinct HF key and back to itself
    for causal in (True, False):
        for bias in ("rotary", "simple"):
            cfg = tiny_config(causal, add_token_type_embeddings=True, normalization_type="batchnorm",
                              relative_positional_bias=bias, tie_word_embeddings=False)
            model = (MegaForCausalLM if causal else MegaForMaskedLM)(cfg)
            task = "causal" if causal else "masked"
            sd = model.state_dict()
            hf_sd = megatrain_to_hf_state_dict(sd, task, cfg)
            assert len(hf_sd) == len(sd) + (cfg.num_hidden_layers if bias == "rotary" else 0)
            assert hf_to_megatrain_state_dict(hf_sd, task).keys() == sd.keys()
    assert len({a for a, _ in KEY_TABLE}) == len(KEY_TABLE)
