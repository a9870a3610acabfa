"""transformers 4.57.6 MEGA bugs that megatrain fixes, each shown on the same weights (HF wrong, megatrain right).

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_known_bugs.py
"""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from transformers import MegaConfig as HFMegaConfig  # noqa: E402
from transformers import MegaForCausalLM as HFMegaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from megatrain.hf.format import load_hf  # noqa: E402
from tests.model.util import ids, randomize_, tiny_config  # noqa: E402

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*GenerationMixin.*")


def _pair(tmp_path, **kw):
    cfg = tiny_config(True, **kw)
    hf_kw = {k: v for k, v in cfg.to_dict().items()
             if k not in ("gradient_checkpointing", "hf_rmsnorm_noop", "ema_block_size")}
    torch.manual_seed(0)
    randomize_(HFMegaForCausalLM(HFMegaConfig(**hf_kw))).save_pretrained(tmp_path)
    return HFMegaForCausalLM.from_pretrained(tmp_path).eval(), load_hf(tmp_path)


def test_left_padding_hf_nan_megatrain_exact(tmp_path):
    hf, ours = _pair(tmp_path)
    x = ids(1, 8)
    xp = torch.cat([torch.full((1, 3), 1), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.isnan(hf(xp, attention_mask=mask, use_cache=False).logits).all()  # the whole sample
        out = ours(xp, attention_mask=mask).logits
        assert (out[:, 3:] - ours(x).logits).abs().max() <= 1e-5


def test_chunking_any_length_hf_raises_megatrain_equals_prefix(tmp_path):
    hf, ours = _pair(tmp_path, use_chunking=True, chunk_size=4)
    x = ids(2, 16)
    with torch.no_grad():
        with pytest.raises(Exception):
            hf(x[:, :13], use_cache=False)
        with pytest.raises(Exception):  # and a causal sequence shorter than one chunk
            hf(x[:, :3], use_cache=False)
        ref = hf(x, use_cache=False).logits
        assert (ours(x[:, :13]).logits - ref[:, :13]).abs().max() <= 1e-5
        assert (ours(x[:, :3]).logits - ref[:, :3]).abs().max() <= 1e-5


def test_truncation_hf_causal_ignores_it_on_its_cache_path(tmp_path):
    hf, ours = _pair(tmp_path, truncation=3)
    x = ids(2, 12)
    with torch.no_grad():
        full_path = hf(x, use_cache=False).logits
        cache_path = hf(x).logits  # use_cache defaults to True for a decoder without labels
        o = ours(x).logits
    assert (cache_path - full_path).abs().max() > 1e-3  # HF's answer depends on use_cache
    assert (o - full_path).abs().max() <= 1e-5  # megatrain always truncates


def test_rmsnorm_hf_does_not_normalize(tmp_path):
    hf, ours = _pair(tmp_path, normalization_type="rmsnorm")
    norm = hf.mega.layers[0].mega_layer.norm
    x = torch.randn(5, 2, 16) * 10
    assert torch.allclose(norm(x), x * norm.norm.weight)  # HF: no normalization at all
    assert ours.config.hf_rmsnorm_noop  # load_hf keeps HF's computation (parity) and says so in the config
