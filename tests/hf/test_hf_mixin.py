"""transformers' own ModelTesterMixin on the exported classes of both families (issues #16, #25): 4.57 against its
native MEGA, and 5.x.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_mixin.py  (~55 s with 4.57 here; the slow 5.x tests ~55 s more)

tests/hf/mixin_suite.py holds the suite (our MegaModelTester and MegalodonModelTester, transformers' mixin from the
sdist that tests/hf/tf_tests.py fetches; a registry that cannot be reached skips, any other fetch failure fails).
Each transformers version runs it once in a subprocess (the fetched tests on sys.path, results as JUnit XML), and
each family's test reads its classes' results:
- 4.57 (this python): every mixin test transformers' own MEGA passes, MEGA's exported remote-code classes pass too
  (cross-attention aside: the suite has none), and no export test fails, MegaGenerationTest (ours: generate, as
  the sdist has no GenerationTesterMixin) included; Megalodon (no native class to compare with): no mixin or
  generation test of its export fails, and at least MIN_PASSED pass;
- 5.x (the cached venv of tests/hf/tf5.py; no native MEGA there): the same for both exports.
Tests not run on an export are KNOWN_GAPS in mixin_suite.py, each with its reason (listed in the failure message).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.hf import tf_tests
from tests.hf.tf5 import installed_version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "tests", "hf", "mixin_suite.py")
# the suite is no toy: fewer passes than this means it did not really run (an import or collection problem)
MIN_PASSED = 30


def run_suite(python: str, version: str, tmp_path, select: str = "") -> dict:
    """{(class, test): 'passed' | 'failed' | 'skipped' | 'known gap'} of mixin_suite.py under `python` (transformers `version`)."""
    xml = tmp_path / f"suite-{version}.xml"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MEGATRAIN_TF_TESTS=tf_tests.tests_dir_for_test(version),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    p = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", "-o",
                        "addopts=", f"--junitxml={xml}", SUITE, *(["-k", select] if select else [])],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert xml.exists(), (p.stdout + p.stderr)[-4000:]
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        key = (case.get("classname", "").rsplit(".", 1)[-1], case.get("name"))
        kinds = {c.tag: c.get("message", "") for c in case}
        out[key] = ("failed" if kinds.keys() & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
        if "KNOWN_GAPS" in kinds.get("skipped", ""):
            out[key] = "known gap"
            out.setdefault("__gaps__", []).append(f"  {key[0]}.{key[1]}: {kinds['skipped']}")
    assert out, (p.stdout + p.stderr)[-4000:]
    out["__log__"] = (p.stdout + p.stderr)[-6000:]
    out["__gaps__"] = "\n".join(out.get("__gaps__", []))
    return out


def _names(results: dict, cls: str, outcome: str) -> set:
    return {name for (c, name), o in ((k, v) for k, v in results.items() if isinstance(k, tuple))
            if c == cls and o == outcome}


@pytest.fixture(scope="module")
def results_4(tmp_path_factory):
    """The whole suite under this python's transformers (4.57: the native MEGA's classes too)."""
    import transformers
    return run_suite(sys.executable, transformers.__version__, tmp_path_factory.mktemp("mixin4"))


@pytest.fixture(scope="module")
def results_5(tmp_path_factory):
    from tests.hf.tf5 import tf5_python_for_test
    py = tf5_python_for_test()
    return run_suite(py, installed_version(py), tmp_path_factory.mktemp("mixin5"), select="Export or Generation")


def _no_failures(res: dict, family: str, min_generation: int) -> None:
    """The family's export: no mixin or generation test fails, enough of each pass (the suite really ran)."""
    mixin, gen = f"{family}ExportModelTest", f"{family}GenerationTest"
    failed = sorted(_names(res, mixin, "failed") | _names(res, gen, "failed"))
    assert len(_names(res, mixin, "passed")) >= MIN_PASSED, res["__log__"]
    assert len(_names(res, gen, "passed")) >= min_generation, res["__log__"]
    assert not failed, f"{family} export fails: {failed}\nKNOWN_GAPS (skipped):\n{res['__gaps__']}\n{res['__log__']}"


def test_export_passes_every_mixin_test_native_mega_passes(results_4):
    import transformers
    if not hasattr(transformers, "MegaModel"):
        pytest.skip(f"transformers {transformers.__version__} has no native MEGA (4.57.6, the dev pin, has)")
    res = results_4
    native, export = _names(res, "MegaNativeModelTest", "passed"), _names(res, "MegaExportModelTest", "passed")
    assert len(native) >= MIN_PASSED, res["__log__"]
    gaps = _names(res, "MegaExportModelTest", "known gap")
    missing = sorted(native - export - gaps)
    failed = sorted(_names(res, "MegaExportModelTest", "failed") | _names(res, "MegaGenerationTest", "failed"))
    assert len(_names(res, "MegaGenerationTest", "passed")) >= 6, res["__log__"]
    assert not missing and not failed, (f"native MEGA passes, the export does not: {missing}; export fails: "
                                        f"{failed}\nKNOWN_GAPS (skipped):\n{res['__gaps__']}\n{res['__log__']}")


def test_megalodon_export_passes_the_mixin(results_4):
    _no_failures(results_4, "Megalodon", 6)


@pytest.mark.slow
def test_export_passes_the_mixin_under_transformers_5(results_5):
    _no_failures(results_5, "Mega", 5)


@pytest.mark.slow
def test_megalodon_export_passes_the_mixin_under_transformers_5(results_5):
    _no_failures(results_5, "Megalodon", 6)


def test_gradient_checkpointing_counts_a_batchnorm_batch_once():
    """With batchnorm the layers stay checkpointed by megatrain's runner, whose recompute leaves the running
    statistics alone (transformers' checkpoint function would count the batch twice); with the other norms they
    are GradientCheckpointingLayers run by transformers' function."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    from megatrain.hf.remote import modeling_mega as mm
    from megatrain.hf.remote.configuration_mega import MegaConfig
    from megatrain.model.layers import BatchNorm
    kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
              shared_representation_size=8, nffn_hidden_size=24, is_decoder=True, bidirectional=False)
    x = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = []
    for enable in (False, True):
        torch.manual_seed(0)
        m = mm.MegaForCausalLM(MegaConfig(**kw, normalization_type="batchnorm")).train()
        if enable:
            m.gradient_checkpointing_enable()
            assert not any(getattr(l, "gradient_checkpointing", False)
                           for l in m.modules() if isinstance(l, GradientCheckpointingLayer))
        m(x, labels=x).loss.backward()
        stats.append([b.running_mean.clone() for b in m._mt.modules() if isinstance(b, BatchNorm)])
    assert stats[0] and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*stats))
    m = mm.MegaForCausalLM(MegaConfig(**kw)).train()
    m.gradient_checkpointing_enable()
    assert [l.gradient_checkpointing for l in m.modules() if isinstance(l, GradientCheckpointingLayer)] == [True] * 2


def test_fetch_placeholders_what_the_sdist_lacks_and_skips_only_an_unreachable_registry(tmp_path, monkeypatch):
    """tests/hf/tf_tests.py: a module the fetched files import but the sdist lacks becomes a placeholder (the
    package imports, the placeholder says what it is); pip failing to reach the registry skips, other failures
    fail (as tests/hf/tf5.py)."""
    import importlib
    import subprocess as sp
    pkg = tmp_path / "transformers_tests"
    pkg.mkdir()
    (pkg / "test_modeling_common.py").write_text("from .generation.test_utils import GenerationTesterMixin\n"
                                                 "from .utils import helpers\nX = GenerationTesterMixin\n")
    (pkg / "utils").mkdir()
    (pkg / "utils" / "helpers.py").write_text("Y = 1\n")
    assert tf_tests._complete(str(pkg)) == ["generation.test_utils"]
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("transformers_tests.test_modeling_common")
    assert mod.X._megatrain_placeholder and tf_tests.placeholders(str(tmp_path)) == ["generation.test_utils"]

    def pip(stderr):
        return lambda *a, **k: sp.CompletedProcess(a, 1, "", stderr)
    monkeypatch.setenv("MEGATRAIN_TF_TESTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sp, "run", pip("ERROR: Could not find a version ... NewConnectionError: "
                                                        "Failed to establish a new connection\n"))
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        tf_tests.tests_dir_for_test("4.57.6")
    monkeypatch.setattr(sp, "run", pip("ERROR: No matching distribution found for transformers\n"))
    with pytest.raises(pytest.fail.Exception, match="No matching distribution"):
        tf_tests.tests_dir_for_test("4.57.6")
