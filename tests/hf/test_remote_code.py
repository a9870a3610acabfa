"""The remote code shipped with every export (megatrain/hf/remote_code.py) on a tiny model of each family, no
training run.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_remote_code.py   (~90 s; the loads are marked slow)

Each family's packaged closure holds its model's op sub-packages (MEGA: ops/ema with its Triton kernel; Megalodon:
ops/cema and ops/tsn with theirs; both: ops/attention with the FlexAttention path, ops/lm_loss with Liger) and
never the other family's model, no file names a package transformers' import check would demand beyond
torch/transformers, and the folder loads with trust_remote_code in transformers 4.57 (this python) and the
cached 5.x venv (tests/hf/tf5.py) where triton and liger_kernel are NOT importable (a CPU user's machine),
and in 5.x where they are: logits == megatrain's (<= 1e-5), greedy generate == megatrain.generate (the cache),
any length, MEGA's four heads forward/backward, all on the torch paths (kernel_backend auto on CPU).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.export.run_fixture import ROOT
from tests.model.util import randomize_, tiny_config

CHECK = os.path.join(ROOT, "tests", "hf", "remote_check.py")
BLOCK = "triton,liger_kernel"


FAMILY_FILES = {  # (files the family's folder must have, prefixes it must not have)
    "mega": (("megatrain_ops_ema.py", "megatrain_ops_ema_triton_kernel.py", "megatrain_ops_ema_torch_blocked.py",
              "megatrain_ops_attention.py", "megatrain_ops_attention_flex_path.py", "megatrain_ops_lm_loss.py",
              "megatrain_ops_lm_loss_liger.py", "megatrain_ops_backend.py", "megatrain_model_context.py",
              "megatrain_model_pieces.py", "megatrain_model_mega_backbone.py", "megatrain_model_lm.py"),
             ("megatrain_model_megalodon", "megatrain_ops_cema", "megatrain_ops_tsn", "megatrain_hf_megalodon")),
    "megalodon": (("megatrain_ops_cema.py", "megatrain_ops_cema_triton_kernel.py", "megatrain_ops_tsn.py",
                   "megatrain_ops_tsn_triton_kernel.py", "megatrain_ops_attention_flex_path.py",
                   "megatrain_ops_lm_loss_liger.py", "megatrain_model_megalodon_backbone.py",
                   "megatrain_model_lm.py", "megatrain_hf_remote_wrapper.py", "megatrain_hf_keymap.py"),
                  ("megatrain_model_mega_backbone", "megatrain_model_mega_ema", "megatrain_hf_mega.py",
                   "modeling_mega.py")),
}


def tiny_model(family: str):
    if family == "mega":
        from megatrain.model import MegaForCausalLM
        torch.manual_seed(0)
        return randomize_(MegaForCausalLM(tiny_config(use_chunking=True, chunk_size=8))).eval()
    from tests.model.test_megalodon import model64  # norms and gains off their zero start: every term matters
    return model64().float().eval()


@pytest.fixture(scope="module", params=["mega", "megalodon"])
def folder(tmp_path_factory, request):
    import megatrain
    from megatrain.hf.remote_code import save_remote
    model = tiny_model(request.param)
    d = tmp_path_factory.mktemp(f"remote_{request.param}")
    out = d / "model"
    out.mkdir()
    why = save_remote(model, str(out))
    assert (why is None) == (request.param == "mega")  # MEGA: native-compatible config (model_type mega)
    x = torch.randint(3, 50, (2, 19), generator=torch.Generator().manual_seed(1))  # 19: not whole chunks
    with torch.no_grad():
        ref = {"x": x, "logits": model(x).logits, "prompt": x[:, :11], "new": 10, "chunk": 8,
               "generate": megatrain.generate(model, x[:, :11], max_new_tokens=10).tolist()}
    torch.save(ref, d / "ref.pt")
    return out, d / "ref.pt", ref, request.param


def test_closure_ships_the_op_packages_and_demands_no_optional_package(folder):
    from transformers.dynamic_module_utils import get_imports

    from megatrain.hf.remote_code import REQUIRED  # torch, transformers and its own dependencies
    out, family = folder[0], folder[3]
    names = set(os.listdir(out))
    needed, foreign = FAMILY_FILES[family]
    for f in needed:
        assert f in names, f
    assert not [n for n in names if n.startswith(foreign)], sorted(names)  # never the other family's model
    # nothing distributed is shipped: of parallel/ only checkpointing.py (gradient_checkpointing_enable), which
    # imports torch and model/ alone
    assert [n for n in names if n.startswith("megatrain_parallel")] == ["megatrain_parallel_checkpointing.py"], \
        sorted(names)
    kernel = (out / ("megatrain_ops_ema_triton_kernel.py" if family == "mega" else
                     "megatrain_ops_cema_triton_kernel.py")).read_text()
    assert "\nimport triton\n" not in kernel and "    import triton\n" in kernel  # guarded, still there
    for f in sorted(n for n in names if n.endswith(".py")):
        # what transformers' loader would refuse to load without: only packages every user has
        demanded = {m for m in get_imports(str(out / f)) if m not in sys.stdlib_module_names} - {"__future__"}
        assert demanded <= REQUIRED, (f, demanded)


# run in a fresh interpreter: the model's whole life in an export (build, forward, backward, generate, every head);
# prints the megatrain modules it loaded that are not packages
_SHIPPED_PROBE = """
import json, sys, torch
import megatrain
from megatrain.hf.remote import modeling_mega as mm
from megatrain.hf.remote.configuration_mega import MegaConfig
kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
          shared_representation_size=8, nffn_hidden_size=24, use_chunking=True, chunk_size=4, bidirectional=False)
x = torch.randint(3, 60, (2, 9))
for name in mm.AUTO_CLASSES.values():
    cfg = MegaConfig(is_decoder=name == "MegaForCausalLM", **kw)
    m = getattr(mm, name)(cfg)
    inp = torch.stack([x, x], 1) if "MultipleChoice" in name else x
    out = m(input_ids=inp)
    next(v for v in out.values() if isinstance(v, torch.Tensor)).float().sum().backward()
mm.MegaForCausalLM(MegaConfig(is_decoder=True, **kw)).generate(x[:, :5], max_new_tokens=3, do_sample=False)
loaded = {n for n, mod in sys.modules.items() if n.startswith("megatrain.") and mod is not None
          and not getattr(mod, "__path__", None)}
from megatrain.hf.remote_code import SHIPPED  # after the count: the probe's own import
print(json.dumps(sorted(loaded - set(SHIPPED["mega"]))))
"""
_SHIPPED_PROBE_MEGALODON = """
import json, sys, torch
import megatrain
from megatrain.hf.remote import modeling_megalodon as mm
from megatrain.hf.remote.configuration_megalodon import MegalodonConfig
cfg = MegalodonConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, chunk_size=4,
                      shared_representation_size=8, intermediate_size=16, nffn_hidden_size=24, cema_ndim=4,
                      norm_num_groups=4)
x = torch.randint(3, 60, (2, 9))
for name in mm.AUTO_CLASSES.values():
    m = getattr(mm, name)(cfg)
    out = m(input_ids=x, output_hidden_states=True, output_attentions=True)
    next(v for v in out.values() if isinstance(v, torch.Tensor)).float().sum().backward()
m = mm.MegalodonForCausalLM(cfg)
m.generate(x[:, :5], max_new_tokens=3, do_sample=False)
m.gradient_checkpointing_enable()
m.train()
m(x, labels=x).loss.backward()
loaded = {n for n, mod in sys.modules.items() if n.startswith("megatrain.") and mod is not None
          and not getattr(mod, "__path__", None)}
from megatrain.hf.remote_code import SHIPPED  # after the count: the probe's own import
print(json.dumps(sorted(loaded - set(SHIPPED["megalodon"]))))
"""


def test_shipped_list_is_the_import_closure():
    """SHIPPED (the explicit list) is exactly what the wrapper modules import; a module the model code imports but
    SHIPPED lacks fails the export with a line naming both."""
    from megatrain.hf import remote_code as rc
    for family in rc.FAMILIES:
        assert sorted(rc.imported_closure(family)) == sorted(rc.SHIPPED[family]), family
    short = tuple(n for n in rc.SHIPPED["mega"] if n != "megatrain.model.context")
    with pytest.raises(rc.RemoteCodeError, match=r"imports megatrain\.model\.context, which a mega export does "
                                                 r"not ship: add it to SHIPPED\['mega'\]"):
        rc.closure("mega", short)


@pytest.mark.parametrize("probe", [_SHIPPED_PROBE, _SHIPPED_PROBE_MEGALODON], ids=["mega", "megalodon"])
def test_running_the_model_loads_no_megatrain_module_beyond_shipped(probe):
    """What the `ast` scan cannot see (importlib, a package's lazy __getattr__ re-export): the model, run in every
    class, loads nothing outside its family's SHIPPED (packages' __init__ aside: a shipped package is listed as
    itself)."""
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


def test_shipped_probe_sees_a_lazy_import(tmp_path):
    """The probe above can fail: a module loaded lazily at run time (here megatrain.data.masking, imported the way a
    lazy re-export would) shows up."""
    probe = _SHIPPED_PROBE.replace("loaded = {", "import importlib; importlib.import_module('megatrain.data.' + "
                                                 "'masking')\nloaded = {")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == ["megatrain.data.masking"]


def _check(py, folder, tmp_path, *extra):
    out, ref, want, family = folder
    if family != "mega":
        extra = (*[e for e in extra if e != "--native"], "--no-heads")  # Megalodon: causal LM, no native class
    res = tmp_path / "res.json"
    p = subprocess.run([py, CHECK, str(out), str(ref), str(res), *extra], cwd=str(tmp_path),
                       env=dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="",
                                OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(res.read_text())
    assert r["remote_diff"] <= 1e-5
    assert r["generate"] == want["generate"]
    assert r["lengths_ok"]
    if family != "mega":
        return r
    assert sorted(r["heads"]) == sorted(["AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                                         "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice"])
    for auto, h in r["heads"].items():
        assert h["backbone_grad"] and h["loss"] == h["loss"], (auto, h)
    return r


@pytest.mark.slow
def test_transformers_4_without_triton(folder, tmp_path):
    r = _check(sys.executable, folder, tmp_path, "--without", BLOCK, "--native")
    assert r["version"].startswith("4.57") and r["without"] == BLOCK.split(",")
    assert r["native_diff"] <= 1e-5 if folder[3] == "mega" else "native_diff" not in r


@pytest.mark.slow
@pytest.mark.parametrize("without", [BLOCK, None], ids=["without_triton", "with_triton_if_installed"])
def test_transformers_5(folder, tmp_path, without):
    from tests.hf.tf5 import tf5_python_for_test
    r = _check(tf5_python_for_test(), folder, tmp_path, *(["--without", without] if without else []))
    assert r["version"].startswith("5.")
