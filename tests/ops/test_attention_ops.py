"""megatrain.ops.attention: every path (PyTorch, FlexAttention) against the plain-tensor reference, forward and
every gradient (q, k, v and the relative-bias parameters), and the whole model on either backend.

Run: PYTHONPATH=. python -m pytest -q tests/ops/test_attention_ops.py

FlexAttention runs eagerly on CPU (its unfused reference implementation), and PyTorch refuses its backward on CPU
with a device check; the `flex_cpu_grad` fixture lifts that check so the same math's gradients are compared here.
With MEGATRAIN_TEST_DEVICE=cuda (tests/ops/util.py) the same tests run torch.compile(flex_attention) -- what the
model runs on CUDA -- on GPU-sized shapes: its tl.dot needs head dims >= 16, and chunks of 256 span several of its
128-blocks (block sparsity, fully masked blocks); fp64 runs there in fp32. The references run on the same device
(in fp32/fp64 they are exact enough; fp32 matmuls stay IEEE unless someone enables TF32). Speed:
bench/gpu/bench_attention.py.
"""
import pytest
import torch
import torch.nn.attention.flex_attention as flex_mod

from megatrain.model import MegaForCausalLM, MegaForMaskedLM
import megatrain.ops.attention as attention_ops
from megatrain.model.mega.attention import RotaryRelativeBias, SimpleRelativeBias
from megatrain.ops.attention import chunk_attention, chunk_attention_ref, kernel_covers
from megatrain.ops.attention.flex_path import _value_heads, flex_chunk_attention
from tests.model.util import ids, randomize_, tiny_config
from tests.ops.util import DEVICE, ON_CUDA

# compiled FlexAttention (CUDA) needs q/k and v head dims >= 16; CPU keeps the tiny ones
Z, E = (16, 64) if ON_CUDA else (8, 12)


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    if not ON_CUDA:  # CUDA has FlexAttention's backward: nothing to lift
        monkeypatch.setattr(flex_mod, "_validate_device", lambda *args: None)


def _bias_module(kind, c, seed):
    cfg = tiny_config(True, shared_representation_size=Z, chunk_size=c, use_chunking=True,
                      max_positions=max(64, c), relative_positional_bias=kind)
    mod = RotaryRelativeBias(cfg) if kind == "rotary" else SimpleRelativeBias(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return mod.to(DEVICE)


def _mask_parts(kind, b, n, c, seed):
    """(key_mask [B, n, C] or None, doc_ids [B, n, C] or None) of one masking scenario."""
    g = torch.Generator().manual_seed(seed)
    key_mask = doc = None
    if kind in ("padding", "left_padding"):
        m = torch.ones(b, n * c, dtype=torch.bool)
        if kind == "padding":
            m[0, -(c + c // 2):] = False  # the last chunk and a half of sample 0
        else:
            m[1, : c + 1] = False  # sample 1's first chunk is all padding, and one key of the next
        key_mask = m.reshape(b, n, c)
    elif kind == "docs":
        # random document boundaries (documents cross chunk boundaries)
        doc = (torch.rand(b, n * c, generator=g) < 0.25).cumsum(-1).reshape(b, n, c)
    return tuple(None if t is None else t.to(DEVICE) for t in (key_mask, doc))


def _valid(b, n, c, causal, key_mask, doc):
    """The test's own "query i may look at key j" mask (independent of the implementation's)."""
    i = torch.arange(c, device=DEVICE)
    valid = torch.ones(b, n, c, c, dtype=torch.bool, device=DEVICE)
    if causal:
        valid &= (i[None, :] <= i[:, None])
    if key_mask is not None:
        valid &= key_mask[:, :, None, :]
    if doc is not None:
        valid &= doc[..., :, None] == doc[..., None, :]
    return valid


def _inputs(b, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, c, Z, generator=g) for _ in range(2))
    v = torch.randn(b, n, c, E, generator=g)
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, bias_mod, dtype, gout):
    pos = torch.arange(q.shape[-2], device=q.device)
    bias = bias_mod(pos, pos).to(dtype)
    out = fn(q, k, v, bias)
    leaves = [q, k, v, *bias_mod.parameters()]
    grads = torch.autograd.grad(out, leaves, gout.to(device=out.device, dtype=out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]


def _err(got, want):
    return [(a.double() - e.double()).abs().max().item() for a, e in zip(got, want)]


CASES = [  # chunk, causal, mask kind
    (4, True, "none"), (8, False, "none"), (16, True, "padding"), (8, False, "padding"),
    (8, True, "left_padding"), (4, False, "left_padding"), (8, True, "docs"), (16, False, "docs"),
]
# CUDA: one chunk of 256 = 2x2 of FlexAttention's 128-blocks (skipped, partial and fully masked blocks); one shape,
# so each (causal, mask) is one compiled variant
C_CUDA = 256
if ON_CUDA:
    CASES = [(C_CUDA, causal, kind) for _, causal, kind in CASES]


@pytest.mark.parametrize("c,causal,kind", CASES)
@pytest.mark.parametrize("bias_kind", ["rotary", "simple"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_forward_and_all_gradients_match_reference(c, causal, kind, bias_kind, backend, flex_cpu_grad,
                                                         triton_interpreter):
    b, n = 2, 3
    q, k, v = _inputs(b, n, c, torch.float32, seed=c)
    bias_mod = _bias_module(bias_kind, c, seed=1)
    key_mask, doc = _mask_parts(kind, b, n, c, seed=2)
    valid = _valid(b, n, c, causal, key_mask, doc)
    gout = torch.randn(b, n, c, E, generator=torch.Generator().manual_seed(3))
    got = _run(lambda q, k, v, bias: chunk_attention(q, k, v, bias, scale=Z**-0.5, causal=causal, key_mask=key_mask,
                                                     doc_ids=doc, backend=backend), q, k, v, bias_mod,
               torch.float32, gout)
    want = _run(lambda q, k, v, bias: chunk_attention_ref(q, k, v, bias, valid, "softmax", Z**-0.5),
                q, k, v, bias_mod, torch.float32, gout)
    for name, a, e in zip(["out", "dq", "dk", "dv", "dbias_params"], got, want):
        assert torch.isfinite(a).all(), name
        # compiled (CUDA): the bias-parameter gradients sum ~C^2 terms in another order: atol scales with them
        atol = 1e-5 * max(1.0, e.abs().max().item()) if ON_CUDA else 1e-5
        torch.testing.assert_close(a, e, rtol=1e-4, atol=atol, msg=name)
    if kind == "left_padding":
        # a query whose keys are all padding gets exactly 0 (not NaN) and passes no gradient back
        empty = ~valid.any(-1)
        assert empty.any() and (got[0][empty] == 0).all()
    assert all(g.abs().max() > 0 for g in got[1:])  # every input really gets a gradient


@pytest.mark.parametrize("c,causal,kind", [(C_CUDA if ON_CUDA else c, causal, kind) for c, causal, kind in
                                           [(8, True, "none"), (8, True, "left_padding"), (16, False, "docs")]])
def test_bf16_error_at_most_twice_plain_pytorch_bf16(c, causal, kind, flex_cpu_grad, triton_interpreter):
    # error against the fp32 reference, forward and every gradient: each path in bf16 may be at most 2x plain
    # PyTorch's own bf16 error (the reference formula run in bf16). (On CPU FlexAttention is its eager math in
    # bf16; on CUDA the compiled kernel, as bench/gpu/bench_attention.py reports it.)
    b, n = 2, 2
    bias_mod = _bias_module("rotary", c, seed=4)
    key_mask, doc = _mask_parts(kind, b, n, c, seed=5)
    valid = _valid(b, n, c, causal, key_mask, doc)
    gout = torch.randn(b, n, c, E, generator=torch.Generator().manual_seed(6))

    def ref(q, k, v, bias):
        return chunk_attention_ref(q, k, v, bias, valid, "softmax", Z**-0.5)

    want = _run(ref, *_inputs(b, n, c, torch.float32, seed=7), bias_mod, torch.float32, gout)
    plain = _err(_run(ref, *_inputs(b, n, c, torch.bfloat16, seed=7), bias_mod, torch.bfloat16, gout), want)
    for backend in ("torch", "triton"):
        got = _run(lambda q, k, v, bias: chunk_attention(q, k, v, bias, scale=Z**-0.5, causal=causal,
                                                         key_mask=key_mask, doc_ids=doc, backend=backend),
                   *_inputs(b, n, c, torch.bfloat16, seed=7), bias_mod, torch.bfloat16, gout)
        assert got[0].dtype == torch.bfloat16
        for name, e_path, e_plain in zip(["out", "dq", "dk", "dv", "dalpha", "dbeta"], _err(got, want), plain):
            assert 0 < e_plain and e_path <= 2 * e_plain, (backend, name, e_path, e_plain)


def test_dense_valid_with_fewer_queries_than_keys_decoding(flex_cpu_grad, triton_interpreter):
    # the decoding form: 3 new queries against 7 keys (4 cached), an arbitrary mask with an empty row
    # (CUDA: 16 against 40, ragged against FlexAttention's blocks)
    b, tq, tk = (2, 16, 40) if ON_CUDA else (2, 3, 7)
    g = torch.Generator().manual_seed(8)
    q, k, v, bias = (torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
                     for shape in ((b, 1, tq, Z), (b, 1, tk, Z), (b, 1, tk, E), (tq, tk)))
    valid = (torch.rand(b, 1, tq, tk, generator=g) < 0.6).to(DEVICE)
    valid[1, 0, 2] = False
    want = chunk_attention_ref(q, k, v, bias, valid, "softmax", 0.3)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v, bias))
    for backend in ("torch", "triton"):
        got = chunk_attention(q, k, v, bias, scale=0.3, valid=valid, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        gg = torch.autograd.grad(got.square().sum(), (q, k, v, bias))
        for a, e in zip(gg, gw):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    assert (want[1, 0, 2] == 0).all()


@pytest.mark.parametrize("act", ["laplace", "relu2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_laplace_relu2_match_reference_on_either_backend(act, backend, triton_interpreter):
    assert not kernel_covers(act, 0.0)  # one implementation: the PyTorch path
    b, n, c = 2, 2, 8
    q, k, v = _inputs(b, n, c, torch.float64, seed=9)
    bias_mod = _bias_module("simple", c, seed=10).double()
    key_mask, _ = _mask_parts("left_padding", b, n, c, seed=0)
    valid = _valid(b, n, c, True, key_mask, None)
    gout = torch.randn(b, n, c, E, dtype=torch.float64, device=DEVICE)
    got = _run(lambda q, k, v, bias: chunk_attention(q, k, v, bias, scale=1.0, causal=True, key_mask=key_mask,
                                                     activation=act, backend=backend), q, k, v, bias_mod,
               torch.float64, gout)
    want = _run(lambda q, k, v, bias: chunk_attention_ref(q, k, v, bias, valid, act), q, k, v, bias_mod,
                torch.float64, gout)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_flex_value_split_into_heads_is_exact():
    assert [_value_heads(e, 256) for e in (12, 256, 2048, 1000, 257)] == [1, 1, 8, 4, 257]
    # CUDA: compiled, fp32 (slices >= 16 wide), so "exact" is up to fp32 rounding of the differently tiled kernels
    b, n, c = (1, 2, 32) if ON_CUDA else (1, 2, 8)
    dtype, tol = (torch.float32, 1e-5) if ON_CUDA else (torch.float64, 1e-12)
    q, k, v = (t.detach() for t in _inputs(b, n, c, dtype, seed=11))
    bias = torch.randn(c, c, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    whole = flex_chunk_attention(q, k, v, bias, scale=0.4, causal=True)
    for v_head_max in ((16, 32, 24) if ON_CUDA else (4, 6, 5)):  # E=64 -> 4, 2, 4 slices; E=12 -> 3, 2, 3
        assert _value_heads(E, v_head_max) > 1
        split = flex_chunk_attention(q, k, v, bias, scale=0.4, causal=True, v_head_max=v_head_max)
        torch.testing.assert_close(split, whole, rtol=tol, atol=tol)
    valid = _valid(b, n, c, True, None, None)
    torch.testing.assert_close(whole, chunk_attention_ref(q, k, v, bias, valid, "softmax", 0.4))


def test_dispatcher_rejects_bad_arguments():
    q, k, v = (t.detach() for t in _inputs(1, 1, 4, torch.float32, seed=0))
    bias = torch.zeros(4, 4)
    # the one backend contract: a MegaConfig.kernel_backend value ("auto" runs here), resolved inside
    torch.testing.assert_close(chunk_attention(q, k, v, bias, scale=1.0, backend="auto"),
                               chunk_attention(q, k, v, bias, scale=1.0, backend="torch"))
    with pytest.raises(ValueError, match="kernel_backend='cuda': must be one of"):
        chunk_attention(q, k, v, bias, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="either by parts"):
        chunk_attention(q, k, v, bias, scale=1.0, causal=True, valid=torch.ones(1, 1, 4, 4, dtype=torch.bool))


# ---- the whole model on either backend -------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_model_flex_backend_equals_torch_backend(causal, flex_cpu_grad, triton_interpreter, monkeypatch):
    # kernel_backend="triton" on CPU tensors needs the Triton interpreter switch (resolve_backend; the fixture);
    # attention then runs FlexAttention, the EMA our kernel: logits and every parameter gradient equal the PyTorch
    # path's. CUDA: compiled kernels in fp32 (flex heads >= 16 wide, chunks of 16), fp32 tolerances.
    calls = []
    monkeypatch.setattr(attention_ops, "flex_chunk_attention",
                        lambda *a, **kw: calls.append(1) or flex_chunk_attention(*a, **kw))
    if ON_CUDA:
        length, chunk, dtype = 48, 16, torch.float32
        dims = dict(shared_representation_size=16, intermediate_size=32)
    else:
        length, chunk, dtype, dims = 24, 8, torch.float64, {}
    x = ids(2, length)
    mask = torch.ones_like(x)
    mask[1, :5] = 0 if causal else 1  # left padding (causal) ...
    mask[0, length - 5:] = 0  # ... and right padding
    doc = (torch.arange(length) >= 10).long().expand(2, length)  # two packed documents crossing a chunk boundary
    x, mask, doc = x.to(DEVICE), mask.to(DEVICE), doc.to(DEVICE)
    res = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cls = MegaForCausalLM if causal else MegaForMaskedLM
        cfg = tiny_config(causal, use_chunking=True, chunk_size=chunk, kernel_backend=backend, **dims)
        model = randomize_(cls(cfg))
        model = model.to(device=DEVICE, dtype=dtype).train()
        out = model(x, attention_mask=mask, labels=x, doc_ids=doc if causal else None)
        out.loss.backward()
        assert len(calls) == (2 if backend == "triton" else 0)  # one call per layer
        res[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = res["torch"], res["triton"]
    assert g0.keys() == g1.keys() and any("rel_pos" in n for n in g0)
    if ON_CUDA:
        torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5 * l0.abs().max().item())
        for name in g0:
            atol = 1e-4 * g0[name].abs().max().item() + 1e-7
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=atol, msg=name)
        return
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-10, msg=name)
