"""Tests of the Megalodon family (megatrain/model/megalodon/):
    PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

The whole causal LM against a plain fp64 re-implementation written from the equations (issue #25 / the reference
code: timestep norm, complex EMA, normalized attention with RoPE inside chunks, two-hop residual, FFN, final norm),
with documents and padding; segments == no segments; incremental decoding carrying (statistics, EMA state,
current-chunk K/V) == the full forward; documents restart every state (packed == separate); any length (padding
inside); the modules' state hand-over; bf16; activation checkpointing from outside; the config's checks.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import megatrain
from megatrain.model import MegalodonConfig, MegalodonForCausalLM, build_model
from megatrain.model.megalodon.cema import ComplexEMA, cema_ref
from megatrain.model.megalodon.norms import TimestepNorm
from megatrain.ops.tsn import timestep_norm_ref
from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing

V = 64


def config(**kw) -> MegalodonConfig:
    base = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                shared_representation_size=8, intermediate_size=16, nffn_hidden_size=32, cema_ndim=3, chunk_size=8,
                norm_num_groups=4, ema_block_size=4)
    return MegalodonConfig(**{**base, **kw})


def model64(seed=0, **kw) -> MegalodonForCausalLM:
    torch.manual_seed(seed)
    m = build_model(config(**kw)).double()
    with torch.no_grad():          # move the zero-initialised "+1" weights and biases off zero: every term matters
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "rmsnorm.weight", "attn.gamma", "attn.beta")):
                p.normal_(0.0, 0.3)
    return m


def ids(b, n, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the model from the equations (fp64 oracle)

def _rms(x, w=None, eps=1e-5):
    y = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * (1 + w)


def _rope(x, pos, base):
    # pairs (2j, 2j+1) as complex numbers, times e^{i pos base^(-2j/d)}
    d = x.shape[-1]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos[:, None].double() * freq)
    return torch.view_as_real(z * rot[:, None, :]).reshape(x.shape)


def reference_logits(model, x, mask=None, doc_ids=None):
    """The causal LM from the equations with the model's parameters, fp64, over the whole sequence (attention as
    one [L, L] matrix masked to causal + same chunk + same document + real key)."""
    cfg = model.config
    mlo = model.megalodon
    b, length = x.shape
    w = torch.ones(b, length, dtype=torch.float64) if mask is None else mask.double()
    resets = None if doc_ids is None else F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=False)
    h = mlo.embed.weight[x]
    pos = torch.arange(length)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // cfg.chunk_size == pos[:, None] // cfg.chunk_size)
    allowed = allowed[None] & (w[:, None, :] > 0)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    H, dz, dv = cfg.num_attention_heads, cfg.shared_representation_size // cfg.num_attention_heads, \
        cfg.intermediate_size // cfg.num_attention_heads
    for layer in mlo.layers:
        a = layer.attn
        xn, _ = timestep_norm_ref(h, a.timenorm.weight + 1, a.timenorm.bias, cfg.norm_num_groups, w, resets)
        ema, _ = cema_ref(xn, a.cema, w, doc_ids)
        mx = _rms(ema, a.rmsnorm.weight, cfg.norm_eps)
        z = _rms((mx @ a.wz.weight.T + a.wz.bias).reshape(b, length, H, dz), eps=cfg.norm_eps)
        g = ((a.gamma + 1) / math.sqrt(dz)).reshape(2, H, dz)
        q, k = z * g[0] + a.beta[0].reshape(H, dz), z * g[1] + a.beta[1].reshape(H, dz)
        q, k = _rope(q, pos % cfg.chunk_size, cfg.rope_base), _rope(k, pos % cfg.chunk_size, cfg.rope_base)
        v = F.silu(xn @ a.wv.weight.T + a.wv.bias).reshape(b, length, H, dv)
        scores = torch.einsum("bihd,bjhd->bhij", q, k).masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, -1))          # a query without a key gets 0
        att = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, length, -1)
        r = F.silu(mx @ a.wr.weight.T + a.wr.bias)
        y = mx @ a.wh1.weight.T + a.wh1.bias + (att * r) @ a.wh2.weight.T + h             # first hop
        f = layer.ffn
        hid = F.layer_norm(y, (cfg.hidden_size,), f.norm.weight + 1, f.norm.bias, cfg.norm_eps)
        act = F.silu(hid @ f.fc1.weight.T)
        if f.fc3 is not None:
            act = act * (hid @ f.fc3.weight.T)
        h = act @ f.fc2.weight.T + h                                                       # second hop: + x
    h, _ = timestep_norm_ref(h, mlo.final_norm.weight + 1, mlo.final_norm.bias, cfg.norm_num_groups, w, resets)
    return h @ model.lm_head.weight.T


@pytest.mark.parametrize("kw", [{}, dict(swiglu=True, num_attention_heads=1, scale_embedding=True)])
def test_lm_matches_the_equations(kw):
    model = model64(**kw)
    x = ids(2, 29)                                   # 4 chunks of 8, the last one ragged (padded inside)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, :5] = 0                                  # left padding
    doc = torch.tensor([[0] * 11 + [1] * 18, [0] * 29])
    got = model(x, attention_mask=mask, doc_ids=doc).logits
    if kw.get("scale_embedding"):
        with torch.no_grad():
            model.megalodon.embed.weight.mul_(math.sqrt(16))
    want = reference_logits(model, x, mask, doc)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- exactness of the pieces mechanisms

def _loss_and_grads(model, x, **kw):
    model.zero_grad()
    out = model(x, labels=x, **kw)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("segment_size", [8, 16])
def test_segments_equal_no_segments(segment_size):
    x = ids(2, 40)
    doc = torch.tensor([[0] * 13 + [1] * 27, [0] * 16 + [1] * 24])     # inside a segment; exactly at an edge
    plain = model64()
    seg = model64(segment_size=segment_size)
    seg.load_state_dict(plain.state_dict())
    for ckpt in (False, True):
        apply_checkpointing(seg, CheckpointPolicy() if ckpt else None)
        seg.train()
        l0, g0 = _loss_and_grads(plain, x, doc_ids=doc)
        l1, g1 = _loss_and_grads(seg, x, doc_ids=doc)
        torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_activation_checkpointing_from_outside_is_exact():
    x = ids(2, 24)
    plain, ck = model64(), model64()
    apply_checkpointing(ck, CheckpointPolicy())
    l0, g0 = _loss_and_grads(plain.train(), x)
    l1, g1 = _loss_and_grads(ck.train(), x)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-12, atol=1e-12)


def test_documents_restart_every_state():
    # two documents packed in one row == each document alone (statistics, EMA state and attention restart)
    model = model64().eval()
    a, b = ids(1, 13, seed=3), ids(1, 19, seed=4)
    packed = model(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 13 + [1] * 19])).logits
    torch.testing.assert_close(packed[:, :13], model(a).logits, rtol=1e-10, atol=1e-10)
    # the second document alone starts a chunk at 0; packed it starts at 13: only whole-chunk aligned starts
    # give identical attention, so compare where RoPE and chunks line up: a document starting at a chunk edge
    b16 = ids(1, 16, seed=5)
    packed = model(torch.cat([ids(1, 16, seed=6), b16], 1), doc_ids=torch.tensor([[0] * 16 + [1] * 16])).logits
    torch.testing.assert_close(packed[:, 16:], model(b16).logits, rtol=1e-10, atol=1e-10)


def test_any_length_pads_to_whole_chunks_inside():
    model = model64().eval()
    x = ids(2, 21)
    padded = torch.cat([x, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 21, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(x).logits, model(padded, attention_mask=mask).logits[:, :21], rtol=1e-10,
                               atol=1e-10)


def test_incremental_decoding_equals_full_forward():
    # prompt of 11 (a chunk + 3), then one token at a time across two more chunk edges; a whole-chunk prompt too
    model = model64().eval()
    x = ids(2, 30)
    with torch.no_grad():
        full = model(x).logits
        for prompt in (11, 16, 3):
            cache = model.new_cache()
            steps = [model(x[:, :prompt], cache=cache).logits]
            steps += [model(x[:, t:t + 1], cache=cache).logits for t in range(prompt, 30)]
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
        assert cache.layers[0].key.shape[1] == 30 % 8                 # only the current chunk's keys are kept
        assert cache.layers[0].norm_state[0].tolist() == [30, 30] and cache.final_state[0].tolist() == [30, 30]


def test_generate_with_left_padding_continues_each_prompt():
    model = model64().eval()
    a, b = ids(1, 6, seed=7), ids(1, 4, seed=8)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    out = megatrain.generate(model, batch, max_new_tokens=5, attention_mask=mask)
    alone = megatrain.generate(model, b, max_new_tokens=5)
    assert torch.equal(out[1, 6:], alone[0, 4:])
    assert torch.equal(out[0], megatrain.generate(model, a, max_new_tokens=5)[0])


def test_modules_hand_their_state_on():
    # the timestep norm and the complex EMA: a sequence in two calls carrying the state == one call, as the
    # references compute it (statistics: ops/tsn; EMA: the complex128 recurrence), and step == forward
    torch.manual_seed(0)
    norm, cema = TimestepNorm(8, 2).double(), ComplexEMA(8, 3, block_size=4).double()
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    x = torch.randn(2, 20, 8, dtype=torch.float64) + 2
    y, st = norm(x)
    y1, s1 = norm(x[:, :7])
    y2, s2 = norm(x[:, 7:], state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    want, _ = timestep_norm_ref(x, norm.weight + 1, norm.bias, 2)
    torch.testing.assert_close(y, want)
    e, h = cema(x)
    e1, h1 = cema(x[:, :7])
    e2, h2 = cema(x[:, 7:], state=h1)
    torch.testing.assert_close(torch.cat([e1, e2], 1), e)
    torch.testing.assert_close(e, cema_ref(x, cema)[0])
    hs, outs = None, []
    for t in range(20):
        yt, hs = cema.step(x[:, t], hs)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, 1), e)
    torch.testing.assert_close(hs, h)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(config())
    x = ids(2, 24)
    want = model(x, labels=x).loss
    got = model.to(torch.bfloat16)(x, labels=x).loss
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 0.05 * want.item()


def test_config_checks_and_round_trip(tmp_path):
    cases = [(dict(norm_num_groups=5), "norm_num_groups=5: must divide hidden_size=16"),
             (dict(num_attention_heads=3), "must be a multiple of num_attention_heads=3"),
             (dict(shared_representation_size=6, num_attention_heads=2), "per-head size must be even"),
             (dict(is_decoder=False), "Megalodon is causal"),
             (dict(segment_size=12), "segment_size=12: must be a multiple of chunk_size=8"),
             (dict(kernel_backend="cuda"), "kernel_backend='cuda'"),
             (dict(init_mode="zeros"), "init_mode='zeros'")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            config(**kw)
    with pytest.raises(ValueError, match="unknown field 'ema_projection_size'"):
        MegalodonConfig.from_dict({**config().to_dict(), "ema_projection_size": 4})
    cfg = config(swiglu=True)
    cfg.to_json_file(tmp_path / "c.json")
    assert MegalodonConfig.from_json_file(tmp_path / "c.json") == cfg
    assert cfg.to_dict()["model_type"] == "megalodon"
