"""Fused LM head + cross-entropy (megatrain.ops.lm_loss), both paths (blockwise PyTorch, Liger's Triton kernel under
the Triton interpreter) against plain F.linear + F.cross_entropy, loss and every gradient.

Run: PYTHONPATH=. python -m pytest -q tests/ops/test_lm_loss.py
With MEGATRAIN_TEST_DEVICE=cuda (tests/ops/util.py) the Liger tests run its compiled kernels on CUDA tensors
(reference on the same device, fp32); the blockwise PyTorch tests stay on CPU (fp64 there is the tight check).
liger-kernel missing: only the Liger tests fail, each with one line saying so.
"""
import functools

import pytest
import torch

import megatrain.model.lm as mega_mod
import megatrain.ops.lm_loss as lm_loss_mod
from megatrain.model import MegaForCausalLM
from megatrain.ops.lm_loss import (IGNORE_INDEX, lm_head_ce_sum, lm_head_ce_sum_ref, lm_head_ce_tokens,
                                  lm_head_ce_tokens_ref, loss_backend)
from tests.model.util import randomize_, tiny_config
from tests.ops.util import DEVICE


def _inputs(n, d, v, dtype, seed=0, ignore_every=0, bias=True, device="cpu"):
    """Drawn on CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).to(device).requires_grad_()
    # a large logit scale so the softmax is far from uniform and the max-subtraction matters
    w = (3 * torch.randn(v, d, generator=g, dtype=dtype)).to(device).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).to(device).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE_INDEX
    return h, w, b, t.to(device)


def _loss_and_grads(fn, h, w, b, t, scale, **kw):
    leaves = [x for x in (h, w, b) if x is not None]
    loss = fn(h, w, b, t, **kw)
    return (loss.detach(), *torch.autograd.grad(loss * scale, leaves))


def _assert_close(got, want, rtol, atol):
    for a, e in zip(got, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# n, d, v, block: blocks dividing n, ragged last block, one block larger than n, block of 1
SHAPES = [(64, 16, 50, 16), (37, 8, 33, 8), (37, 8, 33, 64), (9, 4, 7, 1), (130, 32, 257, 50)]


@pytest.mark.parametrize("n,d,v,block", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp64_matches_reference_tightly(n, d, v, block, bias):
    h, w, b, t = _inputs(n, d, v, torch.float64, ignore_every=5, bias=bias)
    got = _loss_and_grads(lm_head_ce_sum, h, w, b, t, 0.37, block=block)
    want = _loss_and_grads(lm_head_ce_sum_ref, h, w, b, t, 0.37)
    assert got[0].dtype == torch.float64
    _assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,d,v,block", SHAPES)
def test_fp32_matches_reference(n, d, v, block):
    h, w, b, t = _inputs(n, d, v, torch.float32, ignore_every=3)
    got = _loss_and_grads(lm_head_ce_sum, h, w, b, t, 1.0, block=block)
    want = _loss_and_grads(lm_head_ce_sum_ref, h, w, b, t, 1.0)
    assert got[0].dtype == torch.float32
    _assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,d,v,block", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_per_token_losses_match_reference(n, d, v, block, dtype, tol):
    """Each token's loss (0 where ignored) and its gradients, blockwise, against the full-logits oracle; their sum is
    the summed path's loss."""
    h, w, b, t = _inputs(n, d, v, dtype, ignore_every=4)
    scale = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    got = lm_head_ce_tokens(h, w, b, t, block=block)
    want = lm_head_ce_tokens_ref(h, w, b, t)
    assert got.shape == t.shape and got.dtype == want.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (got[t == IGNORE_INDEX] == 0).all() and (got[t != IGNORE_INDEX] > 0).all()
    gg = torch.autograd.grad((got * scale.to(got.dtype)).sum(), (h, w, b))
    gw = torch.autograd.grad((want * scale.to(want.dtype)).sum(), (h, w, b))
    _assert_close(gg, gw, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(got.sum().to(torch.float64), lm_head_ce_sum(h, w, b, t, block=block).detach()
                               .to(torch.float64), rtol=tol * 10, atol=tol * 10)
    # [B, L] targets keep their shape
    assert lm_head_ce_tokens(h.reshape(1, n, d), w, b, t.reshape(1, n), block=block).shape == (1, n)


def test_ignored_rows_get_zero_gradient_and_all_ignored_is_zero():
    h, w, b, t = _inputs(20, 8, 30, torch.float64)
    t[4:13] = IGNORE_INDEX  # a whole block of 4 (rows 4..7, 8..11) and parts of the neighbours
    got = _loss_and_grads(lm_head_ce_sum, h, w, b, t, 1.0, block=4)
    _assert_close(got, _loss_and_grads(lm_head_ce_sum_ref, h, w, b, t, 1.0), rtol=1e-12, atol=1e-12)
    assert (got[1][4:13] == 0).all() and (got[1][:4] != 0).any()
    t[:] = IGNORE_INDEX
    loss, gh, gw, gb = _loss_and_grads(lm_head_ce_sum, h, w, b, t, 1.0, block=4)
    assert loss.item() == 0.0
    assert not gh.any() and not gw.any() and not gb.any()


def test_tied_weight_gradient_accumulates_with_other_use():
    # the head weight is also used elsewhere (as a tied input embedding is): autograd must add both gradients
    h, w, b, t = _inputs(23, 8, 19, torch.float64, ignore_every=4)
    ids = torch.randint(0, 19, (23,), generator=torch.Generator().manual_seed(1))

    def total(fn, **kw):
        emb = torch.nn.functional.embedding(ids, w)
        return fn(h + emb, w, b, t, **kw)

    got = torch.autograd.grad(total(lm_head_ce_sum, block=5), (h, w, b))
    want = torch.autograd.grad(total(lm_head_ce_sum_ref), (h, w, b))
    _assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_frozen_inputs_and_no_grad():
    h, w, b, t = _inputs(17, 8, 11, torch.float64, ignore_every=4)
    w.requires_grad_(False)
    (gh,) = torch.autograd.grad(lm_head_ce_sum(h, w, None, t, block=4), (h,))
    (want,) = torch.autograd.grad(lm_head_ce_sum_ref(h, w, None, t), (h,))
    torch.testing.assert_close(gh, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        loss = lm_head_ce_sum(h, w, b, t, block=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, lm_head_ce_sum_ref(h, w, b, t).detach(), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_close_to_fp32():
    h, w, b, t = _inputs(70, 16, 40, torch.float32, ignore_every=6)
    want = _loss_and_grads(lm_head_ce_sum_ref, h, w * 0.1, b, t, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(lm_head_ce_sum, h, w * 0.1, b, t, 1.0, block=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, e in zip(got, want):
        assert (a - e).abs().max() <= 0.02 * e.abs().max() + 1e-3


def test_rejects_mismatched_targets_and_bad_block():
    h, w, b, t = _inputs(8, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        lm_head_ce_sum(h, w, b, t[:7])
    with pytest.raises(ValueError, match="block=0"):
        lm_head_ce_sum(h, w, b, t, block=0)


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False), dict(add_lm_hidden_dense_layer=False)])
def test_model_loss_only_path_equals_fp64_full_logits(kw, monkeypatch):
    # the model's return_logits=False path (fused, blocks of 7 over 2x13 tokens: ragged) against fp64 CE on its
    # full logits (the model's own full-logits loss is cast to fp32, too coarse for a tight check); tied
    # weights: the embedding and head gradients must add up
    monkeypatch.setattr(mega_mod, "LOSS_BLOCK_TOKENS", 7)
    torch.manual_seed(0)
    model = randomize_(MegaForCausalLM(tiny_config(True, **kw))).double().train()
    x = torch.randint(0, 50, (2, 13))
    labels = x.clone()
    labels[0, 3:9] = IGNORE_INDEX
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    res = []
    for return_logits in (True, False):
        model.zero_grad()
        # "sum": grad_out is exactly 1 (a mean's fp32 1/n would blur an fp64 comparison)
        out = model(x, labels=labels, return_logits=return_logits, loss_reduction="sum")
        loss = out.loss
        if return_logits:
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 50), shifted.reshape(-1),
                                                     reduction="sum")
        loss.backward()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0.float(), rtol=1e-6, atol=1e-6)  # the model's loss is fp32
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-10, msg=name)


# ---- the Liger (Triton) path: the Triton interpreter on CPU, compiled on CUDA -----------------------------------
@pytest.fixture
def liger(triton_interpreter):
    # (tests/ops/conftest.py) TRITON_INTERPRET must also be set when liger_kernel is first imported: Triton picks
    # interpreted kernels at decoration time; nothing imports it on CPU without the variable (loss_backend
    # resolves "torch" first)
    if not lm_loss_mod.liger_available():
        pytest.fail("liger-kernel is not importable: it is a dev dependency (pip install -e '.[dev]'; on the GPU "
                    "machine bench/gpu/check.sh installs it from .whl/)", pytrace=False)
    return functools.partial(lm_head_ce_sum, backend="triton")


@pytest.mark.parametrize("n,d,v,block", SHAPES[:4])
@pytest.mark.parametrize("bias", [True, False])
def test_liger_fp32_matches_reference(n, d, v, block, bias, liger):
    h, w, b, t = _inputs(n, d, v, torch.float32, ignore_every=3, bias=bias, device=DEVICE)
    got = _loss_and_grads(liger, h, w, b, t, 0.37)
    want = _loss_and_grads(lm_head_ce_sum_ref, h, w, b, t, 0.37)
    assert got[0].dtype == torch.float32
    _assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_liger_ignored_rows_tied_weight_and_all_ignored(liger):
    h, w, b, t = _inputs(23, 8, 19, torch.float32, ignore_every=4, device=DEVICE)
    ids = torch.randint(0, 19, (23,), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def total(fn):
        return fn(h + torch.nn.functional.embedding(ids, w), w, b, t)

    got = torch.autograd.grad(total(liger), (h, w, b))
    want = torch.autograd.grad(total(lm_head_ce_sum_ref), (h, w, b))
    _assert_close(got, want, rtol=1e-5, atol=1e-4)
    t[:] = -100
    loss, gh, gw, gb = _loss_and_grads(liger, h, w, b, t, 1.0)
    assert loss.item() == 0.0 and not gh.any() and not gw.any() and not gb.any()


def test_liger_bf16_autocast_close_to_fp32(liger):
    h, w, b, t = _inputs(70, 16, 40, torch.float32, ignore_every=6, device=DEVICE)
    want = _loss_and_grads(lm_head_ce_sum_ref, h, w * 0.1, b, t, 1.0)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _loss_and_grads(liger, h, w * 0.1, b, t, 1.0)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, e in zip(got, want):
        assert (a - e).abs().max() <= 0.02 * e.abs().max() + 1e-3


def test_backend_choice_and_loud_failure(monkeypatch):
    h = torch.zeros(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert loss_backend("auto", h) == "torch" and loss_backend("torch", h) == "torch"
    with pytest.raises(ValueError, match="kernel_backend='triton'"):
        loss_backend("triton", h)  # CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(lm_loss_mod, "liger_available", lambda: False)
    with pytest.raises(ValueError, match="needs liger-kernel"):
        lm_head_ce_sum(h, torch.zeros(4, 3), None, torch.zeros(2, dtype=torch.long), backend="triton")
