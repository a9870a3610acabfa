"""launch/export_hf.py end to end on a real ZeRO-3 SP=2 run of each family (tests/export/run_fixture.py, built once).

Run: PYTHONPATH=. python -m pytest -q tests/export/test_export.py      (~4.5 min; all slow)

The run folder itself is exported (tokenizer found through the shards' manifest) with --verify; the folder loads
in transformers 4.57 natively and with remote code, and in the cached transformers 5.x venv (tests/hf/tf5.py)
with remote code: logits <= 1e-5 vs megatrain, greedy generate == megatrain.generate, any length, the four heads
forward/backward through the Auto classes; tokenizer ids; --verify catches planted mismatches (weights, another
tokenizer, a stale tokenizer.json); --dtype bf16 from the checkpoints/ folder; model.init_from starts a run whose
first loss is transformers' on that batch; --native writes a folder without remote code that 4.57 loads natively.
A Megalodon run (the session's `megalodon_run`, tests/conftest.py) exports with --verify (logits, greedy generate
with the cache, tokenizer ids) to a folder of Megalodon's own remote code that loads in 4.57 and 5.x with the same
logits and greedy tokens; bf16 and planted weights as above. The exporter's bad inputs are rows of
tests/test_bad_input.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.export.run_fixture import ROOT, VOCAB, make_run

pytestmark = pytest.mark.slow
EXPORT = os.path.join(ROOT, "launch", "export_hf.py")


def _env(**kw):
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                **kw)


def export_cli(*args, env=None):
    return subprocess.run([sys.executable, EXPORT, *map(str, args)], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("export_run")))


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    p = export_cli(run[0], out, "--verify")  # the run folder itself as CHECKPOINT (not checkpoints/): just works
    assert p.returncode == 0, p.stderr[-3000:]
    assert "verified" in p.stdout and f"exported {run[0]}/checkpoints/step00000002 -> " in p.stdout, p.stdout
    return out


@pytest.fixture(scope="module")
def reference(run, hf_dir, tmp_path_factory):
    return _reference(run, tmp_path_factory)


def _reference(run, tmp_path_factory):
    import megatrain
    from megatrain.export.load import load_model
    model, cfg = load_model(os.path.join(run[0], "checkpoints"))
    from megatrain.export.verify import PROBES
    from megatrain.data.tokenizer import load_tokenizer
    x = torch.randint(5, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))  # 19: not whole chunks
    prompt = x[:, :11]
    sp = load_tokenizer(run[1])
    with torch.no_grad():
        ref = {"x": x, "logits": model(x).logits, "prompt": prompt, "new": 12, "chunk": cfg.model.chunk_size,
               "generate": megatrain.generate(model, prompt, max_new_tokens=12).tolist(),
               "probes": PROBES, "probe_ids": [sp.encode(s) for s in PROBES]}
    path = tmp_path_factory.mktemp("ref") / "ref.pt"
    torch.save(ref, path)
    return path, ref


def _check(py, hf_dir, ref, tmp_path, native, heads=True):
    res = tmp_path / "res.json"
    p = subprocess.run([py, os.path.join(ROOT, "tests", "hf", "remote_check.py"), str(hf_dir), str(ref[0]),
                        str(res)] + (["--native"] if native else []) + ([] if heads else ["--no-heads"]),
                       cwd=str(tmp_path),
                       env=dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=""),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(res.read_text())
    assert r["remote_diff"] <= 1e-5
    assert r["generate"] == ref[1]["generate"]
    assert r["lengths_ok"]
    assert r["tokenizer_ok"] == [True] * len(ref[1]["probes"])
    assert len(r["heads"]) == (4 if heads else 0)
    for auto, h in r["heads"].items():
        assert h["class"] == auto.replace("AutoModelFor", "MegaFor") and h["backbone_grad"], (auto, h)
        assert h["loss"] == h["loss"] and h["loss"] > 0
    return r


def test_folder_contents_and_tokenizer(hf_dir, run):
    names = set(os.listdir(hf_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.model",
            "tokenizer.json", "configuration_mega.py", "modeling_mega.py", "megatrain_model_mega_backbone.py",
            "megatrain_model_lm.py"} <= names
    assert not [n for n in os.listdir(os.path.dirname(hf_dir)) if n.startswith(".")]  # no temporary left
    d = json.loads((hf_dir / "config.json").read_text())
    assert d["model_type"] == "mega" and d["architectures"] == ["MegaForCausalLM"]
    assert d["auto_map"]["AutoModelForCausalLM"] == "modeling_mega.MegaForCausalLM"
    import ast
    for f in names:  # self-contained: no import of megatrain anywhere
        if f.endswith(".py"):
            for n in ast.walk(ast.parse((hf_dir / f).read_text())):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                    assert not any(m.split(".")[0] == "megatrain" for m in mods), (f, mods)
    card = (hf_dir / "README.md").read_text()
    assert "| steps | 2 |" in card and "trust_remote_code=True" in card and "final loss" in card
    from transformers import AutoTokenizer
    from megatrain.export.verify import PROBES
    from megatrain.data.tokenizer import load_tokenizer
    tok, sp = AutoTokenizer.from_pretrained(str(hf_dir)), load_tokenizer(run[1])
    for s in PROBES:
        assert tok(s, add_special_tokens=False)["input_ids"] == sp.encode(s), s


def test_transformers_4_native_and_remote(hf_dir, reference, tmp_path):
    r = _check(sys.executable, hf_dir, reference, tmp_path, native=True)
    assert r["version"].startswith("4.57") and r["native_diff"] <= 1e-5
    assert r["native_class"].startswith("transformers.models")


def test_transformers_5_remote(hf_dir, reference, tmp_path):
    from tests.hf.tf5 import tf5_python_for_test
    r = _check(tf5_python_for_test(), hf_dir, reference, tmp_path, native=False)
    assert r["version"].startswith("5.")


@pytest.fixture(scope="module")
def other_tok(run, tmp_path_factory):
    """Another tokenizer of the run's size (320 pieces, trained on the upper-cased corpus): other ids."""
    from megatrain.data.tokenizer import TokenizerConfig, train_tokenizer
    corpus = os.path.join(os.path.dirname(run[0]), "corpus")
    d = str(tmp_path_factory.mktemp("other_tok") / "tok")
    train_tokenizer([open(os.path.join(corpus, n)).read().upper() for n in sorted(os.listdir(corpus))],
                    TokenizerConfig(vocab_size=VOCAB, num_threads=1), d)
    return d


def test_run_checkpoints_folder_bf16(run, hf_dir, tmp_path):
    """CHECKPOINT as the run's checkpoints/ folder (the run folder itself is hf_dir's), --dtype bf16 --verify:
    bf16 weights that are the fp32 export's rounded, verified against megatrain on the same rounded weights."""
    from safetensors.torch import load_file
    out = tmp_path / "bf16"
    p = export_cli(os.path.join(run[0], "checkpoints"), out, "--dtype", "bf16", "--verify")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "verified" in p.stdout and p.stderr.strip() == "", p.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a, b = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in (k for k in a if not k.endswith("_float_tensor")):  # transformers' dummy buffer stays as it is
        assert a[k].dtype == (torch.bfloat16 if b[k].is_floating_point() else b[k].dtype), k
        assert torch.equal(a[k], b[k].to(a[k].dtype)), k
    assert "| weights | bf16 |" in (out / "README.md").read_text()


def test_verify_catches_planted_tokenizer_mismatch(run, other_tok, tmp_path):
    """The folder gets another tokenizer's files (same size: the vocab check passes): its ids are not the run's."""
    out = tmp_path / "out"
    p = export_cli(run[0], out, "--tokenizer", other_tok, "--verify")
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--verify failed: tokenizer ids differ from sentencepiece" in lines[0], lines
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_verify_catches_planted_weights_and_stale_tokenizer_json(run, hf_dir, other_tok, tmp_path):
    run_dir, tok = run
    from megatrain.export.load import load_model
    from megatrain.export.verify import verify
    from safetensors.torch import load_file, save_file
    model, _ = load_model(os.path.join(run_dir, "checkpoints"))
    assert verify(str(hf_dir), model, tok) == []
    # planted weights: the folder's logits no longer match megatrain's
    planted = tmp_path / "planted"
    shutil.copytree(hf_dir, planted)
    sd = load_file(planted / "model.safetensors")
    sd["mega.layers.0.nffn.fc1.bias"] += 1e-3
    save_file(sd, planted / "model.safetensors", metadata={"format": "pt"})
    problems = verify(str(planted), model, None)
    assert problems and "logits differ" in problems[0]
    # the run's tokenizer.model next to another tokenizer's tokenizer.json (what AutoTokenizer reads)
    stale = tmp_path / "stale"
    shutil.copytree(hf_dir, stale)
    shutil.copy2(os.path.join(other_tok, "tokenizer.json"), stale / "tokenizer.json")
    problems = verify(str(stale), model, tok)  # 4.57's AutoTokenizer reads tokenizer.model: 5.x's reader catches it
    assert len(problems) == 1 and "tokenizer ids differ from sentencepiece (tokenizer.json)" in problems[0], problems


def test_init_from_continues_pretraining(run, hf_dir, tmp_path):
    """model.init_from=HF_DIR: the first step's loss is transformers' loss on the same batch."""
    from megatrain.config import load_config
    from megatrain.train.metrics import read_metrics
    from megatrain.train.trainer import build_stream
    run_dir = run[0]
    shards = os.path.join(os.path.dirname(run_dir), "shards", "index.json")
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), f"data.shards={shards}",
            f"model.vocab_size={VOCAB}", "train.max_steps=1", "train.warmup_steps=0", "logging.tensorboard=false",
            f"model.init_from={hf_dir}"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args,
                        f"run_dir={tmp_path / 'r'}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    first = read_metrics(str(tmp_path / "r" / "metrics.jsonl"))[0]["loss"]
    cfg = load_config(args[1], args[2:] + [f"run_dir={tmp_path / 'x'}"])
    batch = [s for _, s in zip(range(cfg.data.micro_batch_size), build_stream(cfg, 0, 1))]
    x = torch.stack([b["input_ids"] for b in batch])
    y = torch.stack([b["labels"] for b in batch])  # already shifted: position t predicts labels[t]
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()  # transformers' own MEGA (native 4.57)
    with torch.no_grad():
        logits = hf(x, use_cache=False).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100).item()
    assert first == pytest.approx(want, rel=1e-5, abs=1e-6)
    # a folder of another architecture: one line naming model.init_from, exit 2, before any work
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args,
                        "model.hidden_size=48", f"run_dir={tmp_path / 'r2'}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "model.init_from=" in p.stderr and "hidden_size" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "r2").exists()


def test_native_folder_has_no_remote_code_and_loads_natively(run, tmp_path):
    """--native: config.json + weights + tokenizer + card for transformers 4.57's own MEGA, verified natively."""
    out = tmp_path / "native"
    p = export_cli(run[0], out, "--native", "--verify")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(native: transformers' own classes, no remote code)" in p.stdout and "greedy" not in p.stdout
    names = set(os.listdir(out))
    assert not [n for n in names if n.endswith(".py")] and "auto_map" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "trust_remote_code" not in card and "## Works with" not in card
    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__module__.startswith("transformers.models")


# ---- a Megalodon run: tests/conftest.py's megalodon_run (configs/megalodon_tiny.yaml, ZeRO-3, SP 2, 2 steps)

@pytest.fixture(scope="module")
def megalodon_hf(megalodon_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_megalodon") / "model"
    p = export_cli(megalodon_run[0], out, "--verify")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "verified: logits and tokenizer ids match; greedy generate matches" in p.stdout, p.stdout
    assert "(remote code only: transformers has no Megalodon class of its own" in p.stdout, p.stdout
    return out


@pytest.fixture(scope="module")
def megalodon_reference(megalodon_run, megalodon_hf, tmp_path_factory):
    return _reference(megalodon_run, tmp_path_factory)


def test_megalodon_folder(megalodon_hf, megalodon_run):
    names = set(os.listdir(megalodon_hf))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.model",
            "tokenizer.json", "configuration_megalodon.py", "modeling_megalodon.py", "megatrain_ops_cema.py",
            "megatrain_ops_tsn.py"} <= names
    assert not {"modeling_mega.py", "megatrain_model_mega_backbone.py"} & names  # MEGA's code stays out
    d = json.loads((megalodon_hf / "config.json").read_text())
    assert d["model_type"] == "megalodon" and d["architectures"] == ["MegalodonForCausalLM"]
    assert d["auto_map"] == {"AutoConfig": "configuration_megalodon.MegalodonConfig",
                             "AutoModel": "modeling_megalodon.MegalodonModel",
                             "AutoModelForCausalLM": "modeling_megalodon.MegalodonForCausalLM"}
    from megatrain.config import load_config
    run_cfg = load_config(os.path.join(megalodon_run[0], "config.yaml"))
    assert d["norm_num_groups"] == run_cfg.model.norm_num_groups and "segment_size" not in d
    card = (megalodon_hf / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags: [megalodon,") and "# Megalodon (causal LM)" in card
    assert "| steps | 2 |" in card and "PEFT LoRA target modules: `wv`, `wz`" in card and "Not loadable" not in card


def test_megalodon_transformers_4_and_5(megalodon_hf, megalodon_reference, tmp_path):
    from tests.hf.tf5 import tf5_python_for_test
    (tmp_path / "4").mkdir()
    (tmp_path / "5").mkdir()
    r = _check(sys.executable, megalodon_hf, megalodon_reference, tmp_path / "4", native=False, heads=False)
    assert r["version"].startswith("4.57")
    r = _check(tf5_python_for_test(), megalodon_hf, megalodon_reference, tmp_path / "5", native=False, heads=False)
    assert r["version"].startswith("5.")


def test_megalodon_bf16_and_planted_weights(megalodon_run, megalodon_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatrain.export.load import load_model
    from megatrain.export.verify import verify
    p = export_cli(os.path.join(megalodon_run[0], "checkpoints"), tmp_path / "bf16", "--dtype", "bf16", "--verify")
    assert p.returncode == 0 and "verified" in p.stdout, p.stderr[-3000:]
    a, b = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(megalodon_hf / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(torch.bfloat16)) for k in a)
    planted = tmp_path / "planted"
    shutil.copytree(megalodon_hf, planted)
    sd = load_file(planted / "model.safetensors")
    sd["megalodon.layers.1.attn.cema.omega"] += 1e-3
    save_file(sd, planted / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(os.path.join(megalodon_run[0], "checkpoints"))
    problems = verify(str(planted), model, None)
    assert problems and "logits differ" in problems[0]


def test_verify_without_a_tokenizer(run, tmp_path):
    """--no-tokenizer --verify checks logits and generate (it crashed: the run's tokenizer was looked up unset)."""
    from megatrain.export import export
    info = export(run[0], str(tmp_path / "out"), no_tokenizer=True, do_verify=True)
    assert info["tokenizer"] is None and not (tmp_path / "out" / "tokenizer.model").exists()


def test_native_refuses_a_mega_config_its_classes_compute_differently():
    """--native is checked on the run config before any work: transformers 4.57's MEGA would compute a real
    RMSNorm (or a truncated causal model) differently; Megalodon it does not have."""
    from megatrain.config import MegalodonModelCfg, ModelCfg
    from megatrain.export.folder import ExportError, check_native
    check_native(type("Cfg", (), {"model": ModelCfg(is_decoder=True, bidirectional=False)}), True)
    check_native(type("Cfg", (), {"model": MegalodonModelCfg()}), False)
    for model, why in ((ModelCfg(normalization_type="rmsnorm"), "MegaRMSNorm does not"),
                       (MegalodonModelCfg(), "no Megalodon class")):
        with pytest.raises(ExportError, match=f"^--native: .*{why}.*; export without --native"):
            check_native(type("Cfg", (), {"model": model}), True)
