"""The remote-code classes as transformers citizens (issue #16 items 1-9), in-process on tiny random models.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_citizen.py         (~1 min; this python's transformers)
     the same file under transformers 5.x: test_transformers_5 below (slow; the cached venv, tests/hf/tf5.py)

Each test checks a behaviour against megatrain's own model (the one implementation) or a recomputation: real
modules under transformers' names (PEFT LoRA finds and trains them, merges back, load_hf reads the result), resized
vocabularies, the pooler and bare MegaModel checkpoints, hidden states, tuples, inputs_embeds, gradient
checkpointing, beam search (scores equal a full forward's), is_decoder=False for the causal LM.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import megatrain
from megatrain.hf import load_hf
from megatrain.hf.mega import megatrain_to_hf_state_dict
from megatrain.hf.remote import modeling_mega as mm
from megatrain.hf.remote.configuration_mega import MegaConfig

KW = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
          shared_representation_size=8, nffn_hidden_size=24, use_chunking=True, chunk_size=4, bidirectional=False,
          dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
          nffn_activation_dropout_prob=0.0, pad_token_id=1)


def causal(**kw):
    torch.manual_seed(0)
    return mm.MegaForCausalLM(MegaConfig(**{**KW, "is_decoder": True, **kw})).eval()


def ids(n=9, vocab=64, seed=1):
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def test_modules_are_megatrains_under_transformers_names():
    m = causal()
    mt = m._mt
    # the real modules: every nn.Linear / nn.Embedding of megatrain's model is in the transformers tree
    for kind in (nn.Linear, nn.Embedding):
        ours = {id(x) for x in mt.modules() if isinstance(x, kind)}
        assert ours and ours == {id(x) for x in m.modules() if isinstance(x, kind)}
    # the keys are transformers' (the one key map), the tensors megatrain's very own
    want = megatrain_to_hf_state_dict(mt.state_dict(), "causal", mt.config)
    want.pop("mega.layers.0.mega_layer.rel_pos_bias._float_tensor")
    want.pop("mega.layers.1.mega_layer.rel_pos_bias._float_tensor")
    got = m.state_dict()
    assert sorted(got) == sorted(want)
    assert all(got[k].data_ptr() == want[k].data_ptr() for k in got)
    assert isinstance(m.mega, mm.MegaPreTrainedModel) and m.base_model is m.mega
    assert m.config.num_attention_heads == 1


def test_hidden_states_tuples_and_inputs_embeds():
    m, x = causal(), ids()
    with torch.no_grad():
        o = m(x, output_hidden_states=True)
        mt = m._mt
        assert (o.logits - mt(x).logits).abs().max() == 0
        hs = o.hidden_states
        assert len(hs) == KW["num_hidden_layers"] + 1 and all(h.shape == (2, 9, 16) for h in hs)
        assert torch.equal(hs[0], mt.mega.embeddings(x)) and torch.equal(hs[-1], mt.mega(x))
        t = m(x, output_hidden_states=True, return_dict=False)
        assert isinstance(t, tuple) and torch.equal(t[0], o.logits) and len(t[1]) == len(hs)
        e = m.get_input_embeddings()(x)
        assert (m(inputs_embeds=e).logits - o.logits).abs().max() == 0
        bb = mm.MegaModel(m.config)
        out = bb(x)
        assert out.pooler_output.shape == (2, 16)
        assert torch.equal(out.pooler_output, torch.tanh(bb.pooler.dense(out.last_hidden_state[:, 0])))

def test_output_attentions_are_the_probabilities():
    """[B, chunks, chunk, chunk] per layer, rows summing to 1 over causal keys; recomputed from megatrain's own
    q, k and bias they give the layer's attention output."""
    m, x = causal(), ids(n=8)
    with torch.no_grad():
        o = m(x, output_attentions=True, output_hidden_states=True)
        assert (o.logits - m._mt(x).logits).abs().max() == 0
        assert len(o.attentions) == KW["num_hidden_layers"]
        for p in o.attentions:
            assert p.shape == (2, 2, 4, 4)
            assert torch.allclose(p.sum(-1), torch.ones(2, 2, 4)) and torch.equal(p.triu(1), torch.zeros_like(p))
        # against transformers' native MEGA on the same weights (where 4.57 has it)
        transformers = pytest.importorskip("transformers")
        if not hasattr(transformers, "MegaForCausalLM"):
            pytest.skip("this transformers has no native MEGA")
        native = transformers.MegaForCausalLM(transformers.MegaConfig(**{**KW, "is_decoder": True})).eval()
        native.load_state_dict(m.state_dict(), strict=False)
        n = native(x, output_attentions=True, use_cache=False)
        for a, b in zip(o.attentions, n.attentions):
            assert (a - b).abs().max() <= 1e-5


def test_causal_lm_accepts_is_decoder_false_and_acts_as_decoder(caplog):
    cfg = MegaConfig(**{**KW, "is_decoder": False, "bidirectional": True})
    m = mm.MegaForCausalLM(cfg).eval()
    assert m._mt.config.is_decoder and not m._mt.config.bidirectional
    x = ids()
    with torch.no_grad():  # causal: a later token does not change earlier logits
        a, b = m(x).logits, m(torch.cat([x[:, :5], x[:, 5:].flip(1)], 1)).logits
    assert torch.equal(a[:, :5], b[:, :5])


def test_generation_greedy_and_beam_search():
    m, x = causal(), ids()
    with torch.no_grad():
        # eos_token_id=None: megatrain.generate does not stop at EOS (a random model may emit it)
        assert m.generate(x[:, :5], max_new_tokens=6, do_sample=False, eos_token_id=None).tolist() == \
            megatrain.generate(m._mt, x[:, :5], max_new_tokens=6).tolist()
        g = m.generate(x[:, :6], max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                       length_penalty=0.0, early_stopping=True, return_dict_in_generate=True, output_scores=True,
                       eos_token_id=None, pad_token_id=1)
        # each beam's score = the sum of its tokens' log-probs recomputed by a full forward (no cache): the cache
        # followed its beam through every reorder
        seqs = g.sequences
        logp = torch.log_softmax(m(seqs).logits.float(), -1)[:, 5:-1].gather(-1, seqs[:, 6:, None])[..., 0]
        assert torch.allclose(g.sequences_scores, logp.sum(-1), atol=1e-4), (g.sequences_scores, logp.sum(-1))
        assert len({tuple(s) for s in seqs[:3].tolist()}) == 3
        # a left-padded row generates what it generates alone
        alone = m.generate(x[1:, 2:7], max_new_tokens=4, do_sample=False, eos_token_id=None)
        both = torch.cat([x[:1, :7], torch.cat([torch.full((1, 2), 1), x[1:, 2:7]], 1)], 0)
        mask = torch.ones_like(both)
        mask[1, :2] = 0
        got = m.generate(both, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
        assert got[1, 7:].tolist() == alone[0, 5:].tolist()


def test_gradient_checkpointing_enable_checkpoints_and_keeps_gradients():
    x = ids()
    grads, saved = [], []
    for enable in (False, True):
        m = causal()
        m.train()
        if enable:
            m.gradient_checkpointing_enable()
            on = getattr(type(m), "is_activation_checkpointing", None) or type(m).is_gradient_checkpointing  # 5.x|4.x
            assert on.fget(m) and m._mt.config.gradient_checkpointing
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        # tensors the forward keeps for backward, as seen from outside: a checkpoint keeps its inputs only
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(x, labels=x).loss
        loss.backward()
        saved.append(count[0])
        grads.append(m.get_input_embeddings().weight.grad.clone())
    assert saved[1] < saved[0] / 2, saved
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_resize_token_embeddings_and_load_hf_reads_it(tmp_path):
    m = causal()
    m.resize_token_embeddings(72)
    x = ids(vocab=72)
    with torch.no_grad():
        want = m(x).logits
    assert want.shape[-1] == 72 and m.lm_head.weight is m.get_input_embeddings().weight
    m.save_pretrained(tmp_path)
    back = load_hf(tmp_path)
    with torch.no_grad():
        assert (back(x).logits - want).abs().max() <= 1e-6


def test_bare_megamodel_checkpoints_load(tmp_path):
    """model.mega.save_pretrained (no head, no pooler) and AutoModel's MegaModel (with its pooler) both load."""
    m, x = causal(), ids()
    m.mega.save_pretrained(tmp_path / "bare")
    back = load_hf(tmp_path / "bare")
    assert back.pooler is None
    with torch.no_grad():
        assert (back(x).last_hidden_state - m._mt.mega(x)).abs().max() <= 1e-6
    torch.manual_seed(3)
    bb = mm.MegaModel(m.config).eval()
    bb.save_pretrained(tmp_path / "pooled")
    back = load_hf(tmp_path / "pooled")
    reload = mm.MegaModel.from_pretrained(tmp_path / "pooled").eval()
    with torch.no_grad():
        want = bb(x).pooler_output
        assert (back(x).pooler_output - want).abs().max() <= 1e-6  # pooler weights loaded, not dropped
        assert (reload(x).pooler_output - want).abs().max() <= 1e-6


def test_peft_lora_finds_trains_and_merges(tmp_path):
    import peft  # a dev dependency: a missing peft fails here instead of skipping
    m, x = causal(), ids()
    lora = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    targeted = {n for n, mod in lora.named_modules() if isinstance(mod, peft.tuners.lora.Linear)}
    # every linear of the layers and the LM dense; not the (tied) output head
    assert len(targeted) == 2 * 5 + 1 and not any("lm_head" in n for n in targeted)
    assert any(n.endswith("mega.layers.0.mega_layer.v_proj") for n in targeted)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    lora.train()
    losses = []
    for _ in range(5):
        loss = lora(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        want = lora(input_ids=x).logits
    merged = lora.merge_and_unload()
    with torch.no_grad():
        assert (merged(x).logits - want).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (load_hf(tmp_path)(x).logits - want).abs().max() <= 1e-5


@pytest.mark.slow
def test_transformers_5(tmp_path):
    """This file's tests under transformers 5.x (the cached venv)."""
    from tests.hf.tf5 import tf5_python_for_test
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([tf5_python_for_test(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        os.path.abspath(__file__)], cwd=root, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert " passed" in p.stdout


def test_load_hf_reads_a_native_bare_megamodel(tmp_path):
    """transformers 4.57's own MegaModel (pooler and rotary dummy buffers included) loads as a MegaModelWithPooler
    with the same last_hidden_state and pooler_output."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MegaModel"):
        pytest.skip("this transformers has no native MEGA")
    torch.manual_seed(0)
    native = transformers.MegaModel(transformers.MegaConfig(**{**KW, "is_decoder": True})).eval()
    native.save_pretrained(tmp_path)
    back = load_hf(tmp_path)
    x = ids(n=8)
    with torch.no_grad():
        want = native(x, use_cache=False)
        got = back(x)
    assert back.pooler is not None
    assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-5
    assert (got.pooler_output - want.pooler_output).abs().max() <= 1e-5
