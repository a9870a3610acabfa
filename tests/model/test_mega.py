"""Behaviour of the MEGA model beyond HF parity: any-length chunking, left padding, packed documents, EMA boundary,
real RMSNorm, masked batch norm, feature dropout, loss contract, bad input. (Activation checkpointing:
tests/parallel/test_checkpointing.py.)

Run: PYTHONPATH=. python -m pytest -q tests/model/test_mega.py
"""
import pytest
import torch

from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM, MegaModel
from megatrain.model.layers import BatchNorm, Dropout, RMSNorm
from megatrain.ops.lm_loss import IGNORE_INDEX
from tests.model.util import ids, randomize_, tiny_config

TOL = 1e-5


def _model(causal=True, seed=0, **kw):
    torch.manual_seed(seed)
    cls = MegaForCausalLM if causal else MegaForMaskedLM
    return randomize_(cls(tiny_config(causal, **kw)), seed=seed).eval()


def _diff(a, b):
    return (a - b).abs().max().item()


# ---- chunking at any length ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["softmax", "laplace"])
def test_causal_chunking_any_length_equals_prefix_of_aligned_length(act):
    model = _model(True, use_chunking=True, chunk_size=4, attention_activation=act)
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x).logits
        for length in (1, 3, 5, 13):
            part = model(x[:, :length]).logits
            assert part.shape == (2, length, 50)
            # internal padding must not leak into real positions
            assert _diff(part, full[:, :length]) <= TOL


@pytest.mark.parametrize("act", ["softmax", "relu2"])
def test_bidirectional_chunking_any_length_equals_explicit_padding(act):
    model = _model(False, use_chunking=True, chunk_size=4, attention_activation=act, normalization_type="layernorm",
                   norm_affine=False)
    x = ids(2, 16)
    mask = torch.ones_like(x)
    mask[:, 13:] = 0
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits[:, :13]
        short = model(x[:, :13]).logits
        assert short.shape == (2, 13, 50)
        assert _diff(short, padded) <= TOL
        # and the padding really matters compared with treating the garbage as real tokens
        assert _diff(short, model(x).logits[:, :13]) > 1e-3


# ---- left padding in a causal LM -----------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["softmax", "laplace", "relu2"])
@pytest.mark.parametrize("bias", ["rotary", "simple"])
def test_left_padding_causal_equals_unpadded(act, bias):
    model = _model(True, attention_activation=act, relative_positional_bias=bias)
    x = ids(2, 12)
    pad = 4
    xp = torch.cat([torch.full((2, pad), 1), x], dim=1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(x).logits
        out = model(xp, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert _diff(out[:, pad:], ref) <= TOL


# ---- packed documents ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [None, 4])
def test_doc_ids_equal_separate_documents(causal, chunk):
    kw = dict(use_chunking=True, chunk_size=chunk) if chunk else {}
    model = _model(causal, attention_activation="laplace" if chunk else "softmax", **kw)
    lengths = (4, 8, 4) if chunk else (3, 7, 6)  # chunk-aligned documents when chunking
    docs = [ids(2, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((2, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids).logits
        sep = torch.cat([model(d).logits for d in docs], dim=1)
        assert _diff(out, sep) <= TOL
        assert _diff(model(packed).logits, sep) > 1e-3  # without doc_ids the documents do interact


# ---- EMA boundary hand-over (what sequence parallelism does) -------------------------------------------------
def test_ema_boundary_split_equals_full_sequence():
    model = _model(True, use_chunking=True, chunk_size=4)
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x).logits
        states, calls = [], []

        def first(local_state, decay, direction):  # rank 0: record outgoing states, no incoming state
            calls.append(direction)
            states.append(local_state.clone())
            return torch.zeros_like(local_state)

        it = iter(states)

        def second(local_state, decay, direction):  # rank 1: incoming state = rank 0's state of the same layer
            return next(it)

        a = model(x[:, :8], ema_boundary=first).logits
        b = model(x[:, 8:], ema_boundary=second).logits
    assert calls == ["forward"] * model.config.num_hidden_layers
    assert _diff(torch.cat([a, b], dim=1), full) <= TOL
    with pytest.raises(ValueError, match="whole chunks"):
        model(x[:, :6], ema_boundary=first)


# ---- norms and dropout ---------------------------------------------------------------------------------------
def test_rmsnorm_really_normalizes_and_hf_noop_reproduces_hf():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 8) * 7
    y = norm(x)
    rms = torch.sqrt(torch.mean(torch.square(y / norm.weight), dim=-1))
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    assert torch.allclose(norm(10 * x), y, atol=1e-5)  # scale invariant
    hf_like = RMSNorm(8, hf_noop=True)
    hf_like.load_state_dict(norm.state_dict())
    assert torch.equal(hf_like(x), x * norm.weight)
    # the model option reaches the layers
    model = MegaForCausalLM(tiny_config(True, normalization_type="rmsnorm"))
    assert isinstance(model.mega.layers[0].attn.norm, RMSNorm) and not model.mega.layers[0].attn.norm.hf_noop


def test_batchnorm_statistics_ignore_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    x_garbage = x.clone()
    x_garbage[1, 4:] = 100.0  # padding content must not matter
    ours = BatchNorm(4).train()
    ref = torch.nn.BatchNorm1d(4).train()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
    y = ours(x_garbage, mask)
    real = torch.cat([x[0], x[1, :4]])  # the 10 real tokens
    y_ref = ref(real)
    assert torch.allclose(torch.cat([y[0], y[1, :4]]), y_ref, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).float(), getattr(ref, name).float(), atol=1e-6), name
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x.reshape(-1, 4)).reshape(2, 6, 4), atol=1e-5)


def test_feature_dropout_drops_whole_features_per_sample():
    torch.manual_seed(0)
    drop = Dropout(0.5, featurewise=True).train()
    y = drop(torch.ones(4, 10, 32))
    for b in range(4):
        col = y[b]  # [L, F]: every feature column is all 0 or all 2
        assert torch.all((col == 0).all(0) | (col == 2).all(0))
    assert 0 < (y == 0).float().mean() < 1
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


# ---- loss contract -------------------------------------------------------------------------------------------
def test_causal_loss_shifting_reduction_and_token_count():
    model = _model(True)
    x = ids(2, 10)
    labels = x.clone()
    labels[0, 3] = IGNORE_INDEX
    out = model(x, labels=labels)
    logits = out.logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.num_loss_tokens.item() == 2 * 9 - 1
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    out2 = model(x, labels=shifted, labels_shifted=True, loss_reduction="sum")
    assert torch.allclose(out2.loss, ref * 17, atol=1e-4)
    assert out2.num_loss_tokens.item() == 17
    none = model(x, labels=torch.full_like(x, IGNORE_INDEX))
    assert none.loss.item() == 0.0 and none.num_loss_tokens.item() == 0


def test_masked_lm_loss_only_on_labelled_positions():
    model = _model(False)
    x = ids(2, 10)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, 2], labels[1, 7] = 5, 9
    out = model(x, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[[0, 1], [2, 7]], torch.tensor([5, 9]))
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.num_loss_tokens.item() == 2


def test_tied_embeddings_share_storage():
    tied = MegaForCausalLM(tiny_config(True))
    assert tied.lm_head.weight is tied.mega.embeddings.word_embeddings.weight
    untied = MegaForCausalLM(tiny_config(True, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.mega.embeddings.word_embeddings.weight


def test_bf16_autocast_forward_is_finite_and_close():
    model = _model(True, use_chunking=True, chunk_size=4)
    x = ids(2, 16)
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).logits
    assert torch.isfinite(out).all()
    assert _diff(out.float(), ref) < 0.25


# ---- bad input -----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = _model(True)
    x = ids(2, 6)
    with pytest.raises(ValueError, match="input_ids contains 50"):
        model(torch.full((1, 3), 50))
    with pytest.raises(ValueError, match="input_ids contains -1"):
        model(torch.full((1, 3), -1))
    with pytest.raises(ValueError, match="labels contains 77"):
        model(x, labels=torch.full_like(x, 77))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask must contain only 0 and 1"):
        model(x, attention_mask=torch.full_like(x, 2))
    with pytest.raises(ValueError, match="add_token_type_embeddings"):
        model(x, token_type_ids=torch.ones_like(x))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, labels=x, loss_reduction="avg")
    with pytest.raises(ValueError, match="doc_ids has shape"):
        model(x, doc_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="is_decoder=True"):
        MegaForCausalLM(tiny_config(False))
    with pytest.raises(ValueError, match="is_decoder=False"):
        MegaForMaskedLM(tiny_config(True))
    simple = _model(True, relative_positional_bias="simple", max_positions=8)
    with pytest.raises(ValueError, match="simple relative bias limit 8"):
        simple(ids(1, 9))


def test_backbone_output_shape():
    model = MegaModel(tiny_config(False, use_chunking=True, chunk_size=4)).eval()
    assert model(ids(3, 7)).shape == (3, 7, 16)
    assert isinstance(model.config, MegaConfig)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_loss_equals_full_logits_loss(causal, monkeypatch):
    import megatrain.model.lm as mega_mod

    monkeypatch.setattr(mega_mod, "LOSS_BLOCK_TOKENS", 5)  # several blocks, one ragged
    model = _model(causal).train()
    x = ids(2, 11)
    labels = x.clone()
    labels[1, 4] = IGNORE_INDEX
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(x, labels=labels, loss_reduction="sum", return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) != return_logits
        results.append((out.loss.detach(), out.num_loss_tokens, {n: p.grad.clone() for n, p in
                                                                  model.named_parameters()}))
    (l0, n0, g0), (l1, n1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5) and n0 == n1
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name
    with pytest.raises(ValueError, match="return_logits=False"):
        model(x, return_logits=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense", [False, True])
def test_per_token_losses_and_logits_at(causal, dense, monkeypatch):
    """The keyword API evaluation uses instead of the submodules: loss_reduction="none" gives each token's loss (the
    full-logits cross-entropy per token, 0 where ignored, summing to the "sum" loss) on both head paths, and
    logits_at gives exactly the full logits at those positions."""
    import torch.nn.functional as F
    import megatrain.model.lm as mega_mod

    monkeypatch.setattr(mega_mod, "LOSS_BLOCK_TOKENS", 5)  # several blocks, one ragged
    model = _model(causal, add_lm_hidden_dense_layer=dense).eval()
    x = ids(2, 11)
    labels = x.clone()
    labels[1, 4] = IGNORE_INDEX
    full = model(x)
    want = F.cross_entropy(full.logits.reshape(-1, full.logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)
    summed = model(input_ids=x, labels=labels, labels_shifted=True, loss_reduction="sum", return_logits=False)
    for return_logits in (False, True):
        out = model(input_ids=x, labels=labels, labels_shifted=True, loss_reduction="none",
                    return_logits=return_logits)
        assert out.loss.shape == (2, 11) and out.loss.dtype == torch.float32
        assert torch.allclose(out.loss, want, atol=1e-5) and out.loss[1, 4] == 0
        assert int(out.num_loss_tokens) == 21
        assert torch.allclose(out.loss.sum(), summed.loss, atol=1e-5)
    pos = torch.tensor([0, 7, 10, 7])
    at = model(input_ids=x, logits_at=pos)
    assert at.logits.shape == (2, 4, full.logits.shape[-1]) and at.loss is None
    assert torch.allclose(at.logits, full.logits[:, pos], atol=1e-6)
    assert model(input_ids=x, logits_at=pos[:0]).logits.shape == (2, 0, full.logits.shape[-1])
    with pytest.raises(ValueError, match="logits_at"):
        model(input_ids=x, labels=labels, logits_at=pos)
    with pytest.raises(ValueError, match="logits_at must be a 1-D integer"):
        model(input_ids=x, logits_at=pos.float())
    with pytest.raises(TypeError):
        model(x, None, None, None, None, None, False, "sum", None, True, pos)  # keyword-only


def test_no_module_outside_the_model_reaches_into_it():
    """Outside megatrain/model/ the LMs are called through their keyword API only: no `.mega`, `.dense` or
    `.lm_head` of a megatrain model (evaluation once ran the backbone and the head by hand)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "megatrain"
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("model/", "hf/remote/")):  # the model itself; the exported remote code is its own model
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("mega", "dense", "lm_head"):
                found.append(f"{rel}:{node.lineno} .{node.attr}")
    assert not found, found


@pytest.mark.parametrize("act", ["softmax", "laplace"])
def test_left_padding_training_gradients_are_finite(act):
    model = _model(True, attention_activation=act, use_chunking=True, chunk_size=4, normalization_type="batchnorm")
    model.train()
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # a whole padded chunk plus a partly padded one
    labels = x.masked_fill(mask == 0, IGNORE_INDEX)
    model(x, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_initialisation_follows_transformers():
    cfg = MegaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, nffn_hidden_size=128,
                     is_decoder=True, bidirectional=False)
    torch.manual_seed(0)
    model = MegaForCausalLM(cfg)
    layer = model.mega.layers[0]
    assert abs(layer.attn.mx_proj.weight.std().item() - 0.02) < 0.002
    assert torch.all(layer.attn.mx_proj.bias == 0) and torch.all(layer.attn.qk_bias == 0)
    emb = model.mega.embeddings.word_embeddings.weight
    assert torch.all(emb[cfg.pad_token_id] == 0) and abs(emb.std().item() - 0.02) < 0.002
    beta = layer.attn.ema.ema_expansion_matrix[:, :, 0]
    assert torch.allclose(beta[:, 0].mean(), torch.tensor(1.0), atol=0.01)
    assert torch.allclose(beta[:, 1].mean(), torch.tensor(-1.0), atol=0.01)
    assert torch.all(layer.attn.norm.scalar == 1)


def test_bf16_weights_forward_close_to_fp32():
    model = _model(True, use_chunking=True, chunk_size=4, attention_activation="laplace")
    x = ids(2, 14)
    with torch.no_grad():
        ref = model(x).logits
        low = model.to(torch.bfloat16)(x).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert _diff(low.float(), ref) < 0.25


def test_syncbatchnorm_trains_in_one_process_like_batchnorm():
    x = ids(2, 9)
    losses = []
    for kind in ("batchnorm", "syncbatchnorm"):
        model = _model(False, normalization_type=kind).train()  # same seed -> same weights
        out = model(x, labels=x)
        out.loss.backward()
        losses.append((out.loss.item(), model.mega.layers[0].attn.norm.running_mean.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert torch.equal(losses[0][1], losses[1][1])
