"""The remote code shipped with every export (megatrain/convert/remote_code.py) on a tiny model, no training run.

Run: PYTHONPATH=. python -m pytest -q tests/convert/test_remote_code.py   (~45 s; the three loads are marked slow)

The packaged closure holds the model's op sub-packages (ops/ema with its Triton kernel, ops/attention with the
FlexAttention path, ops/lm_loss with Liger), no file names a package transformers' import check would demand
beyond torch/transformers, and the folder loads with trust_remote_code in transformers 4.57 (this python) and the
cached 5.x venv (tests/convert/tf5.py) where triton and liger_kernel are NOT importable (a CPU user's machine),
and in 5.x where they are: logits == megatrain's (<= 1e-5), greedy generate == megatrain.generate, any length,
the four heads forward/backward, all on the torch paths (kernel_backend auto on CPU).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.convert.run_fixture import ROOT
from tests.model.util import randomize_, tiny_config

CHECK = os.path.join(ROOT, "tests", "convert", "remote_check.py")
BLOCK = "triton,liger_kernel"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import megatrain
    from megatrain.convert.export import write_model_files
    from megatrain.model import MegaForCausalLM
    torch.manual_seed(0)
    model = randomize_(MegaForCausalLM(tiny_config(use_chunking=True, chunk_size=8))).eval()
    d = tmp_path_factory.mktemp("remote")
    out = d / "model"
    out.mkdir()
    assert write_model_files(model, str(out)) is None  # native-compatible config: model_type mega
    x = torch.randint(3, 50, (2, 19), generator=torch.Generator().manual_seed(1))  # 19: not whole chunks
    with torch.no_grad():
        ref = {"x": x, "logits": model(x).logits, "prompt": x[:, :11], "new": 10, "chunk": 8,
               "generate": megatrain.generate(model, x[:, :11], max_new_tokens=10).tolist()}
    torch.save(ref, d / "ref.pt")
    return out, d / "ref.pt", ref


def test_closure_ships_the_op_packages_and_demands_no_optional_package(folder):
    from transformers.dynamic_module_utils import get_imports

    from megatrain.convert.remote_code import REQUIRED  # torch, transformers and its own dependencies
    out = folder[0]
    names = set(os.listdir(out))
    for f in ("megatrain_ops_ema.py", "megatrain_ops_ema_triton_kernel.py", "megatrain_ops_ema_torch_blocked.py",
              "megatrain_ops_attention.py", "megatrain_ops_attention_flex_path.py", "megatrain_ops_lm_loss.py",
              "megatrain_ops_lm_loss_liger.py", "megatrain_ops_backend.py", "megatrain_model_context.py",
              "megatrain_model_pieces.py", "megatrain_model_backbone.py", "megatrain_model_lm.py"):
        assert f in names, f
    # the model runs without any checkpointing applied: nothing distributed (parallel/checkpointing.py) is shipped
    assert not [n for n in names if n.startswith("megatrain_parallel")], sorted(names)
    kernel = (out / "megatrain_ops_ema_triton_kernel.py").read_text()
    assert "\nimport triton\n" not in kernel and "    import triton\n" in kernel  # guarded, still there
    for f in sorted(n for n in names if n.endswith(".py")):
        # what transformers' loader would refuse to load without: only packages every user has
        demanded = {m for m in get_imports(str(out / f)) if m not in sys.stdlib_module_names} - {"__future__"}
        assert demanded <= REQUIRED, (f, demanded)


def _check(py, folder, tmp_path, *extra):
    out, ref, want = folder
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
    assert sorted(r["heads"]) == sorted(["AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                                         "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice"])
    for auto, h in r["heads"].items():
        assert h["backbone_grad"] and h["loss"] == h["loss"], (auto, h)
    return r


@pytest.mark.slow
def test_transformers_4_without_triton(folder, tmp_path):
    r = _check(sys.executable, folder, tmp_path, "--without", BLOCK, "--native")
    assert r["version"].startswith("4.57") and r["without"] == BLOCK.split(",")
    assert r["native_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("without", [BLOCK, None], ids=["without_triton", "with_triton_if_installed"])
def test_transformers_5(folder, tmp_path, without):
    from tests.convert.tf5 import tf5_python_for_test
    r = _check(tf5_python_for_test(), folder, tmp_path, *(["--without", without] if without else []))
    assert r["version"].startswith("5.")
