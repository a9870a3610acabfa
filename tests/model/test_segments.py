"""Sequence-segmented layers (MegaConfig.segment_size) equal the unsegmented model; host offload of checkpoint inputs.

Run: PYTHONPATH=. python -m pytest -q tests/model/test_segments.py
(Composition with sequence parallelism: tests/parallel/test_sequence_segments.py.)
"""
import pytest
import torch

from megatrain.model import MegaForCausalLM, MegaForMaskedLM
from megatrain.model.attention import MovingAverageGatedAttention
from megatrain.model.config import MegaConfig
from megatrain.model.layers import offload_checkpoint_inputs
from megatrain.ops.lm_loss import IGNORE_INDEX
from tests.model.util import ids, randomize_, tiny_config

CHUNK, SEG = 4, 8


def _pair(causal: bool, **kw):
    """(unsegmented, segmented) models with identical weights, fp32, dropout 0."""
    models = []
    for seg in (0, SEG):
        torch.manual_seed(0)
        cls = MegaForCausalLM if causal else MegaForMaskedLM
        cfg = tiny_config(causal, use_chunking=True, chunk_size=CHUNK, ema_block_size=3, segment_size=seg, **kw)
        models.append(randomize_(cls(cfg), seed=0, std=0.1).train())
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


def test_segmented_layers_see_one_segment_forward_and_recompute(monkeypatch):
    """The working set is one segment: every attention call -- forward, the pre-pass EMA is separate, and the
    recompute in backward -- gets at most SEG tokens, and the recompute happens per segment."""
    seen = []
    forward = MovingAverageGatedAttention.forward

    def spy(self, x, ctx, cache=None):
        seen.append((x.shape[1], torch.is_grad_enabled()))
        return forward(self, x, ctx, cache)

    monkeypatch.setattr(MovingAverageGatedAttention, "forward", spy)
    _, seg = _pair(False, gradient_checkpointing=True)
    x, labels, kw = _data(False, 32, docs=True, padding=False)
    seg(x, labels=labels, return_logits=False, **kw).loss.backward()
    layers, pieces = seg.config.num_hidden_layers, 32 // SEG
    assert [n for n, _ in seen] == [SEG] * (2 * layers * pieces), seen   # forward + recompute, piece by piece


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
    from megatrain.hf.format import hf_config_dict
    d = hf_config_dict(tiny_config(True, use_chunking=True, chunk_size=CHUNK, segment_size=SEG), "causal")
    assert "segment_size" not in d and d["chunk_size"] == CHUNK


# ---- host offload of checkpointed layer inputs -----------------------------------------------------------------
@pytest.mark.parametrize("segment", [0, SEG], ids=["layers", "segments"])
def test_offload_is_exact_and_saves_only_the_checkpoint_inputs(monkeypatch, segment):
    import megatrain.model.layers as layers
    packed = []

    def counting_hooks():
        # the same mechanism, counting what it is handed: the outermost checkpoints' tensor inputs only
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    ref, seg = _pair(False, gradient_checkpointing=True)
    model = seg if segment else ref
    x, labels, kw = _data(False, 32, docs=True, padding=True)
    plain = _loss_and_grads(model, x, labels, kw)
    with offload_checkpoint_inputs(True):
        out = model(x, labels=labels, return_logits=False, **kw)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    offloaded = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in plain[1]:     # save_on_cpu on CPU tensors: the identity, so bit-identical
        assert torch.equal(plain[1][n], offloaded[1][n]), n
    assert torch.equal(plain[0], offloaded[0])

    monkeypatch.setattr(layers, "_host_offload_hooks", counting_hooks)
    with offload_checkpoint_inputs(True):
        out = model(x, labels=labels, return_logits=False, **kw)
    out.loss.backward()
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    if not segment:
        # one [B, L, D] input per layer, nothing from the nested EMA/FFN checkpoints or the recompute
        assert packed == [(2, 32, D)] * L, packed
    else:
        # per piece: layer 0 takes token ids, later layers hidden states, each saved once (the next layer's
        # pre-pass runs inside the piece that makes them); besides those the segment's mask / doc ids and
        # incoming EMA states [B, D, N]
        N = model.config.ema_projection_size
        assert [s for s in packed if s[-1] == D] == [(2, SEG, D)] * (4 * (L - 1)), packed
        assert set(packed) == {(2, SEG), (2, SEG, D), (2, D, N)}, packed
    packed.clear()
    with offload_checkpoint_inputs(False):
        model(x, labels=labels, return_logits=False, **kw).loss.backward()
    assert packed == []
