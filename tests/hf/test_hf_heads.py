"""The four downstream heads (megatrain/model/heads.py) == transformers 4.57.6's, both directions.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_heads.py

For each head: a transformers model with weights far from init -> save_pretrained -> load_hf: outputs, loss and
gradients equal (<= 1e-5 fp32); save_hf -> transformers' Auto class: the same outputs; the state dict round trips.
"""
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from megatrain.hf.format import load_hf, save_hf  # noqa: E402
from megatrain.model import (MegaForMultipleChoice, MegaForQuestionAnswering,  # noqa: E402
                             MegaForSequenceClassification, MegaForTokenClassification)
from tests.model.util import ids, randomize_, tiny_config  # noqa: E402

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*GenerationMixin.*")
TOL = 1e-5

# name -> (megatrain class, transformers Auto class name, num_labels, extra config, problem_type)
HEADS = {
    "seqcls": (MegaForSequenceClassification, "AutoModelForSequenceClassification", 3, {}, None),
    "seqcls_regression": (MegaForSequenceClassification, "AutoModelForSequenceClassification", 1,
                          dict(use_chunking=True, chunk_size=4), None),
    "seqcls_multilabel": (MegaForSequenceClassification, "AutoModelForSequenceClassification", 4,
                          dict(classifier_dropout=0.0), "multi_label_classification"),
    "tokcls": (MegaForTokenClassification, "AutoModelForTokenClassification", 5,
               dict(add_token_type_embeddings=True), None),
    "qa": (MegaForQuestionAnswering, "AutoModelForQuestionAnswering", 2, dict(normalization_type="layernorm"), None),
    "mc": (MegaForMultipleChoice, "AutoModelForMultipleChoice", 2, {}, None),
}


def _labels(name, n, batch, length):
    g = torch.Generator().manual_seed(5)
    if name == "seqcls_regression":
        return dict(labels=torch.randn(batch, generator=g))
    if name == "seqcls_multilabel":
        return dict(labels=(torch.rand(batch, n, generator=g) > 0.5).float())
    if name == "seqcls":
        return dict(labels=torch.randint(0, n, (batch,), generator=g))
    if name == "tokcls":
        return dict(labels=torch.randint(0, n, (batch, length), generator=g))
    if name == "qa":  # one position beyond L: clamped and ignored (transformers' rule)
        return dict(start_positions=torch.tensor([1, 40]), end_positions=torch.tensor([5, 7]))
    return dict(labels=torch.tensor([1, 0]))


def _outputs(o):
    return [t for t in (getattr(o, "logits", None), getattr(o, "start_logits", None), getattr(o, "end_logits", None))
            if t is not None]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_parity_both_directions(name, tmp_path):
    ours_cls, auto_name, n, extra, problem = HEADS[name]
    cfg = tiny_config(False, **extra)
    hf_kw = {k: v for k, v in cfg.to_dict().items()
             if k not in ("gradient_checkpointing", "hf_rmsnorm_noop", "ema_block_size", "kernel_backend")}
    hf_cfg = transformers.MegaConfig(**hf_kw, num_labels=n, problem_type=problem)
    hf_cls = getattr(transformers, ours_cls.__name__)
    torch.manual_seed(0)
    randomize_(hf_cls(hf_cfg)).save_pretrained(tmp_path / "hf")
    hf = hf_cls.from_pretrained(tmp_path / "hf").eval()
    ours = load_hf(tmp_path / "hf")
    assert type(ours) is ours_cls and ours.num_labels == n
    mc = name == "mc"
    batch, length = 2, 8
    x = ids(batch * (3 if mc else 1), length, seed=1)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    tt = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(2)) if "tokcls" in name else None
    if mc:
        x, mask = x.view(batch, 3, length), mask.view(batch, 3, length)
    kw = dict(attention_mask=mask, token_type_ids=tt, **_labels(name, n, batch, length))
    ho, oo = hf(x, **kw), ours(x, **kw)
    for h, o in zip(_outputs(ho), _outputs(oo), strict=True):
        assert h.abs().max() > 1e-3
        assert (h - o).abs().max().item() <= TOL
    assert abs(ho.loss.item() - oo.loss.item()) <= TOL
    ho.loss.backward()
    oo.loss.backward()
    hg = dict(hf.named_parameters())
    for k_ours, k_hf in (("mega.embeddings.word_embeddings.weight", "mega.embedding_layer.word_embeddings.weight"),
                         ("mega.layers.0.attn.ema.damping_factor", "mega.layers.0.mega_layer.ema_gate.damping_factor")):
        g_o = dict(ours.named_parameters())[k_ours].grad
        assert g_o.abs().max() > 0
        assert (g_o - hg[k_hf].grad).abs().max().item() <= TOL

    # megatrain -> transformers' Auto class
    save_hf(ours, tmp_path / "ours")
    d = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert d["architectures"] == [ours_cls.__name__] and len(d["id2label"]) == n
    hf2 = getattr(transformers, auto_name).from_pretrained(tmp_path / "ours").eval()
    assert type(hf2) is hf_cls
    with torch.no_grad():
        for h, o in zip(_outputs(hf2(x, attention_mask=mask, token_type_ids=tt)),
                        _outputs(ours(x, attention_mask=mask, token_type_ids=tt)), strict=True):
            assert (h - o).abs().max().item() <= TOL
    back = load_hf(tmp_path / "ours")
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_heads_reject_bad_label_counts():
    cfg = tiny_config(False)
    with pytest.raises(ValueError, match="num_labels=2"):
        MegaForQuestionAnswering(cfg, num_labels=3)
    with pytest.raises(ValueError, match="num_labels"):
        MegaForTokenClassification(cfg, num_labels=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        MegaForMultipleChoice(cfg)(ids(2, 8))
