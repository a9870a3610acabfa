"""Incremental decoding: megatrain.generate carries EMA state + per-chunk K/V and matches the full forward pass.

Run: PYTHONPATH=. python -m pytest -q tests/model/test_generate.py
"""
import pytest
import torch

import megatrain
from megatrain.model import MegaForCausalLM, MegaForMaskedLM
from tests.model.util import ids, randomize_, tiny_config

TOL = 1e-5


def _model(**kw):
    torch.manual_seed(0)
    return randomize_(MegaForCausalLM(tiny_config(True, **kw))).eval()


CASES = {
    "nochunk_softmax_rotary": {},
    "nochunk_laplace_simple": dict(attention_activation="laplace", relative_positional_bias="simple"),
    "chunk4_softmax": dict(use_chunking=True, chunk_size=4),
    "chunk4_relu2_simple_batchnorm": dict(use_chunking=True, chunk_size=4, attention_activation="relu2",
                                          relative_positional_bias="simple", normalization_type="batchnorm"),
    "chunk5_postnorm_no_nffn": dict(use_chunking=True, chunk_size=5, normalize_before_mega=False,
                                    use_normalized_ffn=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("prompt_len", [1, 6, 8, 9, 10])
def test_greedy_logits_equal_full_forward(name, prompt_len):
    model = _model(**CASES[name])
    x = ids(2, prompt_len)
    out, logits = megatrain.generate(model, x, max_new_tokens=11, return_logits=True)
    assert out.shape == (2, prompt_len + 11)
    assert torch.equal(out[:, :prompt_len], x)
    with torch.no_grad():
        full = model(out).logits
    # the logits each new token was picked from == the full pass over the final sequence (crossing chunks)
    assert (logits - full[:, prompt_len - 1:-1]).abs().max().item() <= TOL
    assert torch.equal(out[:, prompt_len:], full[:, prompt_len - 1:-1].argmax(-1))
    assert full.abs().max() > 1e-2


def test_left_padded_batch_continues_like_each_unpadded_prompt():
    model = _model()
    a, b = ids(1, 7, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([a, torch.cat([torch.full((1, 3), 1), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out, logits = megatrain.generate(model, batch, max_new_tokens=6, attention_mask=mask, return_logits=True)
    out_a, log_a = megatrain.generate(model, a, max_new_tokens=6, return_logits=True)
    out_b, log_b = megatrain.generate(model, b, max_new_tokens=6, return_logits=True)
    assert torch.equal(out[0, 7:], out_a[0, 7:]) and torch.equal(out[1, 7:], out_b[0, 4:])
    assert (logits[0] - log_a[0]).abs().max() <= TOL and (logits[1] - log_b[0]).abs().max() <= TOL


def test_sampling_reproducible_and_filters():
    model = _model(use_chunking=True, chunk_size=4)
    x = ids(3, 5)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = megatrain.generate(model, x, 12, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, generator=g())
    s2 = megatrain.generate(model, x, 12, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, generator=g())
    assert torch.equal(s1, s2)
    greedy = megatrain.generate(model, x, 12)
    assert torch.equal(megatrain.generate(model, x, 12, do_sample=True, top_k=1, generator=g()), greedy)
    assert torch.equal(megatrain.generate(model, x, 12, do_sample=True, top_p=1e-6, generator=g()), greedy)
    free = megatrain.generate(model, x, 12, do_sample=True, temperature=5.0, generator=g())
    assert not torch.equal(free, greedy)
    # sampled tokens stay inside the top-k set of their own step
    out, logits = megatrain.generate(model, x, 12, do_sample=True, top_k=3, generator=g(), return_logits=True)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 5:, None]).any(-1).all()


def test_eos_then_padding_and_model_mode_restored():
    model = _model()
    x = ids(2, 4)
    greedy = megatrain.generate(model, x, 8)
    eos = int(greedy[0, 6])
    out = megatrain.generate(model, x, 8, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0, 0].item() + 4
    assert torch.all(out[0, first + 1:] == model.config.pad_token_id)
    model.train()
    megatrain.generate(model, x, 2)
    assert model.training


def test_generate_bad_arguments():
    model = _model()
    x = ids(1, 3)
    with pytest.raises(ValueError, match="MegaForCausalLM"):
        megatrain.generate(MegaForMaskedLM(tiny_config(False)), x, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        megatrain.generate(model, x, -1)
    with pytest.raises(ValueError, match="temperature"):
        megatrain.generate(model, x, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        megatrain.generate(model, x, 2, top_p=1.5)
    with pytest.raises(ValueError, match="left padding"):
        megatrain.generate(model, ids(1, 3), 2, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="truncation"):
        megatrain.generate(_model(truncation=4), x, 2)
    assert megatrain.generate(model, x, 0).shape == (1, 3)
