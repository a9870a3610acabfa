"""Megalodon's transformers format (megatrain/hf/megalodon.py, keymap.py, remote/modeling_megalodon.py) in this
process, on a tiny model: no training run, no subprocess.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_megalodon_export.py     (~10 s)

The key map (megatrain's own names; the bare backbone without `megalodon.`), config.json (every field but the run
knobs; a MEGA field is an error naming it), save_hf / load_hf round trips (causal LM and bare backbone, logits
equal), the refusals (no native folder for Megalodon, no masked task, a Megalodon folder cannot start a MEGA run),
and the transformers classes: logits and hidden states equal megatrain's, inputs_embeds, the state-dict keys are
the key map's, gradient checkpointing changes no gradient, resize_token_embeddings and PEFT's LoRA targets act on
the modules megatrain runs. Loading through trust_remote_code (4.57, 5.x): tests/hf/test_remote_code.py; the mixin
and generation: tests/hf/test_hf_mixin.py; a real run exported: tests/export/test_export.py.
"""
import json

import pytest
import torch

from megatrain.hf import keymap, load_hf, save_hf
from megatrain.hf import megalodon as fmt
from megatrain.model import MegalodonConfig, MegalodonForCausalLM
from megatrain.model.megalodon.config import KNOBS
from tests.model.test_megalodon import config, ids, model64


@pytest.fixture(scope="module")
def model():
    return model64(seed=3).float().eval()


def test_key_map_is_megatrains_names_and_the_backbone_drops_its_prefix(model):
    keys = list(model.state_dict())
    assert [keymap.to_hf_key(k, "causal", "megalodon") for k in keys] == keys
    assert keymap.from_hf_state_dict(keymap.to_hf_state_dict(model.state_dict(), "causal", "megalodon"), "causal",
                                     "megalodon").keys() == model.state_dict().keys()
    assert keymap.to_hf_key("megalodon.layers.1.attn.cema.alpha", "backbone", "megalodon") == "layers.1.attn.cema.alpha"
    assert keymap.rename("final_norm.weight", "backbone", False, "megalodon") == "megalodon.final_norm.weight"
    with pytest.raises(ValueError, match=r"no key-map rule for megatrain key 'dense.weight' \(megalodon\)"):
        keymap.to_hf_key("dense.weight", "causal", "megalodon")


def test_config_json_has_every_field_but_the_knobs():
    cfg = config(segment_size=16, kernel_backend="torch", swiglu=True)
    d = fmt.hf_config_dict(cfg, "causal")
    assert d["model_type"] == "megalodon" and d["architectures"] == ["MegalodonForCausalLM"]
    assert set(d) - {"architectures"} == MegalodonConfig.field_names() - set(KNOBS)
    assert set(KNOBS) < MegalodonConfig.field_names()
    back = fmt.config_from_hf_dict({**d, "transformers_version": "5.0", "use_cache": True, "dtype": "float32"})
    assert back == cfg.replace(segment_size=0, kernel_backend="auto", ema_block_size=128)  # knobs: defaults
    with pytest.raises(ValueError, match=r"x/config.json: unknown Megalodon field 'ema_projection_size'"):
        fmt.config_from_hf_dict({**d, "ema_projection_size": 4}, "x/config.json")


def test_save_and_load_round_trip(model, tmp_path):
    from megatrain.hf.megalodon import MegalodonBackbone
    with pytest.raises(ValueError, match=r"^save_hf: transformers has no Megalodon class of its own"):
        save_hf(model, tmp_path / "native")
    assert not (tmp_path / "native").exists()  # refused before writing
    save_hf(model, tmp_path / "lm", native=False)
    x = ids(2, 19)
    back = load_hf(tmp_path / "lm")
    assert isinstance(back, MegalodonForCausalLM) and not back.training
    with torch.no_grad():
        # <= 1e-5: the run knob ema_block_size (4 here) is not exported, the export runs the default's blocking
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=0)
    base = MegalodonBackbone(model.config, backbone=model.megalodon)
    save_hf(base, tmp_path / "base", native=False)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["MegalodonModel"]
    loaded = load_hf(tmp_path / "base")
    assert isinstance(loaded, MegalodonBackbone)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model.megalodon(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"task='masked': a Megalodon folder .* loads as one of causal, backbone"):
        load_hf(tmp_path / "lm", task="masked")


def test_a_megalodon_folder_cannot_start_a_mega_run(model, tmp_path):
    from megatrain.hf.init_from import check_init_from
    from tests.model.util import tiny_config
    save_hf(model, tmp_path / "lm", native=False)
    with pytest.raises(ValueError, match=r"model.init_from=.*lm: a megalodon folder \(config.json model_type "
                                         r"'megalodon'\) cannot start a run of model.model_type=mega"):
        check_init_from(str(tmp_path / "lm"), tiny_config())


@pytest.fixture(scope="module")
def hf_model(model):
    """transformers' MegalodonForCausalLM (the remote class, imported here) holding `model`'s weights."""
    from megatrain.hf.remote.configuration_megalodon import MegalodonConfig as HFConfig
    from megatrain.hf.remote.modeling_megalodon import MegalodonForCausalLM as HFCausal
    hf = HFCausal(HFConfig(**fmt.hf_config_dict(model.config, "causal"))).eval()
    missing, unexpected = hf.load_state_dict(keymap.to_hf_state_dict(model.state_dict(), "causal", "megalodon"))
    assert not missing and not unexpected
    return hf


def test_transformers_class_computes_megatrains_model(model, hf_model):
    x = ids(2, 19)  # not whole chunks (8)
    with torch.no_grad():
        out = hf_model(x, output_hidden_states=True)
        ref = model(x).logits
        h = model.megalodon(x)
        embeds = hf_model.get_input_embeddings()(x)
        via_embeds = hf_model(inputs_embeds=embeds).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], h, atol=1e-5, rtol=0)  # the last: the final norm's output
    assert torch.equal(out.hidden_states[0], hf_model.get_input_embeddings()(x))  # the first layer's input
    torch.testing.assert_close(via_embeds, out.logits, atol=1e-6, rtol=0)
    assert sorted(hf_model.state_dict()) == sorted(model.state_dict())


def test_gradient_checkpointing_changes_no_gradient(model):
    from megatrain.hf.remote.configuration_megalodon import MegalodonConfig as HFConfig
    from megatrain.hf.remote.modeling_megalodon import MegalodonForCausalLM as HFCausal
    from transformers.modeling_layers import GradientCheckpointingLayer
    x = ids(2, 19)
    grads = []
    for enable in (False, True):
        hf = HFCausal(HFConfig(**fmt.hf_config_dict(model.config, "causal")))
        hf.load_state_dict(keymap.to_hf_state_dict(model.state_dict(), "causal", "megalodon"))
        if enable:
            hf.gradient_checkpointing_enable()
            layers = [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]
            assert [type(m).__name__ for m in layers] == ["MegalodonBlock"] * 2
            assert all(m.gradient_checkpointing for m in layers)
        hf.train()
        hf(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in hf.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_resize_and_lora_act_on_the_modules_megatrain_runs(model):
    from peft import LoraConfig, get_peft_model

    from megatrain.export.card import LORA_TARGETS
    from megatrain.hf.remote.configuration_megalodon import MegalodonConfig as HFConfig
    from megatrain.hf.remote.modeling_megalodon import MegalodonForCausalLM as HFCausal
    hf = HFCausal(HFConfig(**fmt.hf_config_dict(model.config.replace(swiglu=True), "causal")))
    hf.resize_token_embeddings(80)
    x = torch.tensor([[70, 71, 79, 5, 6]])  # ids past the old vocabulary
    assert hf(x).logits.shape == (1, 5, 80)
    names = {n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(LORA_TARGETS["megalodon"]) <= names and names - set(LORA_TARGETS["megalodon"]) == {"lm_head"}
    lora = get_peft_model(hf, LoraConfig(r=2, target_modules=list(LORA_TARGETS["megalodon"]), init_lora_weights=False))
    with torch.no_grad():
        changed = lora(x).logits
        base = lora.get_base_model()._mt(x).logits  # megatrain's model runs the LoRA layers (synced)
    assert torch.equal(changed, base)
    with lora.disable_adapter(), torch.no_grad():
        assert not torch.allclose(lora(x).logits, changed)
