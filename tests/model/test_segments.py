"""Sequence-segmented layers (MegaConfig.segment_size) equal the unsegmented model, checkpointed or not.

Run: PYTHONPATH=. python -m pytest -q tests/model/test_segments.py
(Composition with sequence parallelism: tests/parallel/test_sequence_segments.py; the per-segment recompute and
the host offload: tests/parallel/test_checkpointing.py.)
"""
import pytest
import torch

from megatrain.model import MegaForCausalLM, MegaForMaskedLM
from megatrain.model.mega.config import MegaConfig
from megatrain.ops.lm_loss import IGNORE_INDEX
from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
from tests.model.util import ids, randomize_, tiny_config

CHUNK, SEG = 4, 8


def _pair(causal: bool, **kw):
    """(unsegmented, segmented) models with identical weights, fp32, dropout 0; checkpointed (applied from outside)
    with gradient_checkpointing=True, as the trainer does."""
    models = []
    for seg in (0, SEG):
        torch.manual_seed(0)
        cls = MegaForCausalLM if causal else MegaForMaskedLM
        cfg = tiny_config(causal, use_chunking=True, chunk_size=CHUNK, ema_block_size=3, segment_size=seg, **kw)
        model = randomize_(cls(cfg), seed=0, std=0.1).train()
        models.append(apply_checkpointing(model, policy_from_config(cfg.gradient_checkpointing)))
    return models


def _data(causal: bool, length: int, docs: bool, padding: bool):
    x = ids(2, length)
    labels = x.clone()
    if not causal:
        g = torch.Generator().manual_seed(3)
        labels[torch.rand(x.shape, generator=g) < 0.6] = IGNORE_INDEX
    kw = {}
    if docs:
        # row 0: documents starting inside segments; row 1: one starting exactly at each segment edge
        d = torch.zeros(2, length, dtype=torch.long)
        d[0, 5] = d[0, 19] = 1
        d[1, SEG:length:SEG] = 1
        kw["doc_ids"] = d.cumsum(1)
    if padding:
        mask = torch.ones_like(x)
        mask[1, length - 6:] = 0          # right padding across a segment edge
        mask[0, :3] = 0                   # left padding
        kw["attention_mask"] = mask
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return x, labels, kw


def _loss_and_grads(model, x, labels, kw, return_logits=False):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, return_logits=return_logits, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, seg, what):
    (l0, g0), (l1, g1) = ref, seg
    rel = abs(l1.item() - l0.item()) / abs(l0.item())
    assert rel <= 1e-6, f"{what}: loss {l1.item()!r} vs {l0.item()!r} (rel {rel:.1e})"
    assert g0.keys() == g1.keys(), what
    for n in g0:
        worst = (g1[n] - g0[n]).abs().max().item()
        assert worst <= 1e-5, f"{what}: grad {n} differs by {worst:.1e}"
    assert sum(g.abs().sum() for g in g0.values()) > 0


@pytest.mark.parametrize("causal", [True, False], ids=["clm", "mlm"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("docs,padding", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "docs", "pad", "docs+pad"])
def test_segmented_equals_unsegmented(causal, ckpt, docs, padding):
    # 30 tokens: padded to 32 inside = 4 segments of 8 (2 chunks each); the last one holds the inner padding
    ref, seg = _pair(causal, gradient_checkpointing=ckpt)
    x, labels, kw = _data(causal, 30, docs, padding)
    # the reference takes the plain path (full logits, dense + tanh outside the backbone)
    _assert_same(_loss_and_grads(ref, x, labels, kw, return_logits=True), _loss_and_grads(seg, x, labels, kw),
                 f"causal={causal} ckpt={ckpt} docs={docs} padding={padding}")


def test_short_inputs_and_eval_take_the_same_path():
    ref, seg = _pair(True)
    ref.eval(), seg.eval()
    for length in (SEG, 3 * SEG + 2):        # one segment (unsegmented path) and several
        x = ids(2, length)
        torch.testing.assert_close(seg(x).logits, ref(x).logits, rtol=1e-5, atol=1e-6)


def test_bad_segment_size_names_the_key():
    base = dict(use_chunking=True, chunk_size=CHUNK)
    for kw, why in ((dict(segment_size=6), "multiple of chunk_size=4"),
                    (dict(segment_size=-1), ">= 0"),
                    (dict(segment_size=8, use_chunking=False, chunk_size=-1), "use_chunking"),
                    (dict(segment_size=8, normalization_type="batchnorm"), "batchnorm"),
                    (dict(segment_size=8, normalization_type="syncbatchnorm"), "syncbatchnorm"),
                    (dict(segment_size=8, truncation=16), "truncation")):
        with pytest.raises(ValueError, match="segment_size") as e:
            tiny_config(True, **{**base, **kw})
        assert why in str(e.value) and "\n" not in str(e.value)
    assert MegaConfig().segment_size == 0


def test_segment_size_is_not_written_to_hf_config():
    from megatrain.hf.mega import hf_config_dict
    d = hf_config_dict(tiny_config(True, use_chunking=True, chunk_size=CHUNK, segment_size=SEG), "causal")
    assert "segment_size" not in d and d["chunk_size"] == CHUNK
