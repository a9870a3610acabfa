"""Activation checkpointing and host offload applied from outside (megatrain/parallel/checkpointing.py).

Run: PYTHONPATH=. python -m pytest -q tests/parallel/test_checkpointing.py
Exact gradients (dropout and batch norm included), one segment per recompute, offload of the outermost checkpoints'
inputs only, the policy's pieces, and a model without a runner running plain (what the exported remote code gets).
"""
import pytest
import torch

from megatrain.model import MegaForCausalLM, MegaForMaskedLM
from megatrain.model.mega.attention import MovingAverageGatedAttention
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.parallel import checkpointing
from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing, policy_from_config
from tests.model.test_segments import SEG, _data, _loss_and_grads, _pair
from tests.model.util import ids, randomize_, tiny_config


def _model(causal=True, seed=0, **kw):
    torch.manual_seed(seed)
    cls = MegaForCausalLM if causal else MegaForMaskedLM
    return randomize_(cls(tiny_config(causal, **kw)), seed=seed).eval()


def _count_calls(monkeypatch, cls):
    """Every forward of `cls` modules, as (length, grad enabled)."""
    seen = []
    forward = cls.forward

    def spy(self, x, *args, **kw):
        seen.append((x.shape[1], torch.is_grad_enabled()))
        return forward(self, x, *args, **kw)

    monkeypatch.setattr(cls, "forward", spy)
    return seen


# ---- activation checkpointing --------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_gradient_checkpointing_gives_identical_gradients(causal):
    kw = dict(use_chunking=True, chunk_size=4, dropout_prob=0.2, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, nffn_activation_dropout_prob=0.1, normalization_type="batchnorm")
    grads = []
    for ckpt in (False, True):
        model = _model(causal, **kw).train()
        apply_checkpointing(model, policy_from_config(ckpt))
        x = ids(2, 14)
        torch.manual_seed(123)
        out = model(x, labels=x)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads[-1].update({n: b.clone() for n, b in model.named_buffers()})  # recompute must not update BN stats
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_torch_compile(monkeypatch):
    """A checkpointed model under torch.compile (AOT autograd: the recompute is traced under a proxy mode) gives the
    eager gradients. A custom checkpoint context_fn is refused there ("checkpoint not implemented for ...
    context_fn"), so the runner tells forward from recompute without one (~7 s: one aot_eager compile)."""
    x = ids(2, 16)
    grads = []
    for compiled in (False, True):
        model = apply_checkpointing(_model(chunk_size=8, use_chunking=True), CheckpointPolicy()).train()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        run(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch._dynamo.reset()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_the_policy_decides_which_pieces_recompute(monkeypatch):
    """Counted forwards: plain = once per layer; "layer" alone = forward + one recompute; the default (EMA nested
    too) recomputes the EMA once more inside the layer's recompute. The config flag alone changes nothing: the
    model never decides (a model without a runner, e.g. in the exported remote code, runs plain)."""
    ema_calls = _count_calls(monkeypatch, MultiDimDampedEMA)
    layers = 2

    def ema_forwards(policy, **kw):
        model = _model(True, use_chunking=True, chunk_size=4, **kw).train()
        apply_checkpointing(model, policy)
        ema_calls.clear()
        model(ids(2, 12), labels=ids(2, 12)).loss.backward()
        return len(ema_calls)

    assert ema_forwards(None, gradient_checkpointing=True) == layers
    assert ema_forwards(CheckpointPolicy(pieces=frozenset({"layer"}))) == 2 * layers
    assert ema_forwards(CheckpointPolicy()) == 3 * layers
    assert ema_forwards(CheckpointPolicy(pieces=frozenset({"ema"}))) == 2 * layers
    # eval / no_grad: never checkpointed, whatever the policy
    model = apply_checkpointing(_model(True, use_chunking=True, chunk_size=4), CheckpointPolicy())
    ema_calls.clear()
    with torch.no_grad():
        model.train()(ids(2, 12))
    assert len(ema_calls) == layers


def test_two_models_keep_their_own_policy(monkeypatch):
    # no module globals: checkpointing one model leaves another (and a removed policy) plain
    calls = _count_calls(monkeypatch, MovingAverageGatedAttention)
    a = apply_checkpointing(_model(True).train(), CheckpointPolicy())
    b = _model(True).train()

    def attention_forwards(model):
        calls.clear()
        model(ids(1, 6), labels=ids(1, 6)).loss.backward()
        return len(calls)

    assert (attention_forwards(b), attention_forwards(a)) == (2, 4)   # 2 layers; forward + recompute
    assert attention_forwards(apply_checkpointing(a, None)) == 2


def test_bad_policy_names_the_piece():
    with pytest.raises(ValueError, match=r"unknown piece\(s\) \['block'\]"):
        CheckpointPolicy(pieces=frozenset({"block"}))
    with pytest.raises(ValueError, match="has no pieces"):
        apply_checkpointing(torch.nn.Linear(2, 2), CheckpointPolicy())


def test_segmented_layers_see_one_segment_forward_and_recompute(monkeypatch):
    """The working set is one segment: every attention call -- forward, the pre-pass EMA is separate, and the
    recompute in backward -- gets at most SEG tokens, and the recompute happens per segment."""
    seen = _count_calls(monkeypatch, MovingAverageGatedAttention)
    _, seg = _pair(False, gradient_checkpointing=True)
    x, labels, kw = _data(False, 32, docs=True, padding=False)
    seg(x, labels=labels, return_logits=False, **kw).loss.backward()
    layers, pieces = seg.config.num_hidden_layers, 32 // SEG
    assert [n for n, _ in seen] == [SEG] * (2 * layers * pieces), seen   # forward + recompute, piece by piece


# ---- host offload of checkpointed layer inputs -----------------------------------------------------------------
@pytest.mark.parametrize("segment", [0, SEG], ids=["layers", "segments"])
def test_offload_is_exact_and_saves_only_the_checkpoint_inputs(monkeypatch, segment):
    packed = []

    def counting_hooks():
        # the same mechanism, counting what it is handed: the outermost checkpoints' tensor inputs only
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    ref, seg = _pair(False, gradient_checkpointing=True)
    model = seg if segment else ref
    x, labels, kw = _data(False, 32, docs=True, padding=True)
    plain = _loss_and_grads(model, x, labels, kw)
    apply_checkpointing(model, CheckpointPolicy(offload=True))
    out = model(x, labels=labels, return_logits=False, **kw)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    offloaded = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in plain[1]:     # save_on_cpu on CPU tensors: the identity, so bit-identical
        assert torch.equal(plain[1][n], offloaded[1][n]), n
    assert torch.equal(plain[0], offloaded[0])

    monkeypatch.setattr(checkpointing, "_host_offload_hooks", counting_hooks)
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
    apply_checkpointing(model, CheckpointPolicy(offload=False))
    model(x, labels=labels, return_logits=False, **kw).loss.backward()
    assert packed == []


@pytest.mark.parametrize("segment", [0, 8], ids=["layers", "segments"])
def test_megalodon_offload_is_exact_and_saves_only_the_checkpoint_inputs(monkeypatch, segment):
    """The same mechanism on the other family (its pieces: layer, segment, ema, ffn): bit-identical gradients with
    offload; what goes to the host is each outermost piece's input -- per layer one [B, L, D] (the final norm runs
    inside the last layer's piece), per segment the stages' hidden states (layers 1.. and the final-norm stage)."""
    from megatrain.model import MegalodonConfig, MegalodonForCausalLM
    packed = []

    def counting_hooks():
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    torch.manual_seed(0)
    model = MegalodonForCausalLM(MegalodonConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, shared_representation_size=8,
        intermediate_size=16, nffn_hidden_size=32, cema_ndim=3, chunk_size=4, norm_num_groups=4,
        segment_size=segment, gradient_checkpointing=True)).train()
    x = ids(2, 32)
    doc = torch.tensor([[0] * 11 + [1] * 21, [0] * 32])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, labels=x, doc_ids=doc, return_logits=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    apply_checkpointing(model, CheckpointPolicy())
    plain = run()
    apply_checkpointing(model, CheckpointPolicy(offload=True))
    offloaded = run()
    assert torch.equal(plain[0], offloaded[0])
    for n in plain[1]:
        assert torch.equal(plain[1][n], offloaded[1][n]), n
    monkeypatch.setattr(checkpointing, "_host_offload_hooks", counting_hooks)
    run()
    D, L = 16, 2
    hidden = [s for s in packed if s[-1] == D and len(s) == 3 and s[1] != D]
    assert hidden == ([(2, 32, D)] * L if not segment else [(2, segment, D)] * (32 // segment) * L), packed
