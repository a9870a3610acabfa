"""Real transformers clients on real exports of both families, in transformers 4.57 and 5.x (issues #16, #25): each
client of the model card's "Works with" list (megatrain.export.card.CLIENTS), run as the card prints it, against
megatrain's numbers.

Run: PYTHONPATH=. python -m pytest -q tests/hf/test_hf_clients.py            (~4 min; 4.57 only: -m "not slow")

Three tiny training runs (tests/export/run_fixture.py: a causal and a masked MEGA LM and a Megalodon LM -- the
session's megalodon_run --, 2 steps) exported with --verify through megatrain.export (tokenizer, remote code, card)
are what a user gets. tests/hf/clients_check.py runs every client on each export it applies to (family and task) in
one process per transformers version (this python: 4.57; the cached 5.x venv of tests/hf/tf5.py, slow). Each
(client, export) is a test here:
  trainer          Trainer + AutoModelForSequenceClassification (MEGA), gradient_checkpointing=True, 20 steps: the
                   loss falls; megatrain's load_hf reads the saved fine-tune with the same logits on a padded batch
  trainer-lm       Trainer + AutoModelForCausalLM, gradient_checkpointing=True, 20 steps: the same
  peft-lora        LoRA on the card's (family's) target modules trains (loss falls), merges into exactly those weights, saves;
                   megatrain's load_hf reads the merged folder with the same logits (<= 1e-5)
  text-generation  pipeline greedy tokens == megatrain.generate's
  fill-mask        the tokenizer puts the mask id where the text says <mask>; the scores are megatrain's
                   probabilities there (<= 1e-5)
  lm-eval          lm_eval's word/byte perplexity and bits per byte of a local json file == megatrain's own
                   evaluation (megatrain.eval.loss) of the same text, within 1e-4 (relative)
"""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from megatrain.export.card import CLIENTS, FAMILIES, FILL_MASK_TEXT, LORA_TARGETS
from tests.export.run_fixture import ROOT, make_run

CHECK = os.path.join(ROOT, "tests", "hf", "clients_check.py")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question:",
         "def f(x):\n\treturn x + 1\n", "Whether 'tis nobler in the mind to suffer", "a fox, a brown fox",
         "numbers 12345 and 6789.", "the lazy dog and the quick fox", "  indented line\n"] * 2
DOCS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question:\nWhether 'tis",
        "def f(x):\n\treturn x + 1", "Naïve café — 東京; numbers 12345 and 6789.  two  spaces"]
PROMPT = "The quick brown"
NEW_TOKENS = 12  # the card's max_new_tokens


def _inputs(vocab: int) -> dict:
    r = random.Random(0)
    return {"texts": TEXTS, "labels": [int("fox" in t) for t in TEXTS], "docs": DOCS, "prompt": PROMPT,
            "batches": [[[r.randrange(5, vocab) for _ in range(19)] for _ in range(2)] for _ in range(8)]}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, megalodon_run):
    """{"FAMILY/TASK": (export folder, megatrain model, sentencepiece)}: a tiny run per family and objective,
    exported with --verify."""
    from megatrain.data.tokenizer import load_tokenizer
    from megatrain.export import export
    from megatrain.export.load import load_model
    base = tmp_path_factory.mktemp("clients")
    runs = {name: make_run(str(base / name.replace("/", "_")), zero=0, sp=1, objective=objective)
            for name, objective in (("mega/causal", "clm"), ("mega/masked", "mlm"))}
    runs["megalodon/causal"] = megalodon_run
    out = {}
    for name, (run, tok) in runs.items():
        info = export(run, str(base / f"{name.replace('/', '_')}_hf"), do_verify=True)
        assert f"{info['family']}/{info['task']}" == name
        out[name] = (info["out"], load_model(os.path.join(run, "checkpoints"))[0], load_tokenizer(tok))
    return out


def _run_clients(py: str, exports, work) -> dict:
    spec = {"exports": {name: e[0] for name, e in exports.items()}, "work": str(work),
            "inputs": _inputs(min(e[1].config.vocab_size for e in exports.values()))}
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(work / "modules"), HF_DATASETS_CACHE=str(work / "datasets"),
               TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([py, CHECK, str(work / "spec.json"), str(work / "out.json")], cwd=str(work), env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return json.loads((work / "out.json").read_text())


@pytest.fixture(scope="module")
def results_4(exports, tmp_path_factory):
    r = _run_clients(sys.executable, exports, tmp_path_factory.mktemp("tf4"))
    assert r["version"].startswith("4.57")
    return r


@pytest.fixture(scope="module")
def results_5(exports, tmp_path_factory):
    from tests.hf.tf5 import tf5_python_for_test
    r = _run_clients(tf5_python_for_test(), exports, tmp_path_factory.mktemp("tf5"))
    assert r["version"].startswith("5.")
    return r


def assert_trainer(r, folder, model, sp, cls="MegaForSequenceClassification"):
    assert r["class"] == cls and r["checkpointing"]
    losses = r["losses"]
    assert len(losses) == 20 and all(map(math.isfinite, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, losses
    from megatrain.hf import load_hf  # the fine-tuned folder as transformers saved it, padded batch included
    back, saved = load_hf(r["final_dir"]), torch.load(r["logits"])
    assert type(back).__name__ == cls and saved["attention_mask"].min() == 0
    with torch.no_grad():
        got = back(saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    assert (got - saved["logits"]).abs().max() <= 1e-5


def assert_trainer_lm(r, folder, model, sp):
    assert_trainer(r, folder, model, sp, cls=type(model).__name__)  # MegaForCausalLM / MegalodonForCausalLM


def assert_peft_lora(r, folder, model, sp):
    from megatrain.hf import load_hf
    from safetensors.torch import load_file
    assert r["lora_left"] == [] and r["keys_equal"]
    # merged into every weight of the card's target modules, and nothing else moved
    family, layers = model.config.model_type, model.config.num_hidden_layers
    keys = load_file(os.path.join(folder, "model.safetensors")).keys()
    want = sorted(k for k in keys if any(k == f"{t}.weight" or k.endswith(f".{t}.weight")
                                         for t in LORA_TARGETS[family]))
    # MEGA: 5 linear layers a layer + the LM's dense; Megalodon: 7 a layer (no SwiGLU gate fc3 here)
    assert len(want) == {"mega": 5 * layers + 1, "megalodon": 7 * layers}[family] and r["changed"] == want, \
        r["changed"]
    assert r["loss_merged"] < r["loss_base"]
    back = load_hf(r["merged_dir"])
    saved = torch.load(r["logits"])
    with torch.no_grad():
        assert (back(saved["x"]).logits - saved["logits"]).abs().max() <= 1e-5
        assert (model(saved["x"]).logits - saved["logits"]).abs().max() > 1e-4  # the merge changed the model


def assert_text_generation(r, folder, model, sp):
    import megatrain
    ids = sp.encode(PROMPT)
    assert r["prompt_ids"] == ids
    eos = model.config.eos_token_id
    with torch.no_grad():
        want = megatrain.generate(model, torch.tensor([ids]), max_new_tokens=NEW_TOKENS, eos_token_id=eos)[0]
    new = want[len(ids):].tolist()
    if eos in new:  # transformers stops at the end of sequence token (megatrain pads after it)
        new = new[:new.index(eos) + 1]
    assert r["generated_ids"] == ids + new
    assert r["text"] == r["decoded"]
    if _valid_utf8(sp, ids + new):  # a tiny random model may emit byte pieces that are no UTF-8 text: the two
        assert r["text"] == sp.decode(ids + new)  # libraries then render the invalid bytes differently


def _valid_utf8(sp, ids) -> bool:
    """Whether the pieces' bytes (byte-fallback pieces as their byte) are valid UTF-8."""
    raw = b"".join(bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i) else
                   b"" if sp.is_control(i) else sp.id_to_piece(i).replace("\u2581", " ").encode() for i in ids)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def assert_fill_mask(r, folder, model, sp):
    from megatrain.data.tokenizer import hf_encode, special_token_ids
    ids = hf_encode(sp, FILL_MASK_TEXT, specials_in_text=True)
    mask = special_token_ids(sp)["mask"]
    assert r["ids"] == ids and ids.count(mask) == 1
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, ids.index(mask)].double(), -1)
    top = r["top"]
    assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    kth = p.topk(5).values[-1].item()
    for token, score in top:  # megatrain's probabilities, and the 5 largest (near-ties in either order)
        assert abs(p[token].item() - score) <= 1e-5 and score >= kth - 1e-6, (token, score)


def assert_lm_eval(r, folder, model, sp):
    from megatrain.data.tokenizer import special_token_ids, token_byte_lengths
    from megatrain.eval.heldout import HeldOut, positions_in_document
    from megatrain.eval.loss import evaluate_windows
    from megatrain.ops.lm_loss import IGNORE_INDEX
    # megatrain's evaluation of the same documents: one window each, the first token predicted from <s> (the
    # harness's prefix token: the tokenizer's bos)
    docs = [sp.encode(d) for d in DOCS]
    L = max(map(len, docs))
    bos, pad = special_token_ids(sp)["bos"], special_token_ids(sp)["pad"]
    x = torch.full((len(docs), L), pad)
    y = torch.full((len(docs), L), IGNORE_INDEX)
    doc_ids = torch.ones(len(docs), L, dtype=torch.long)
    for i, d in enumerate(docs):
        x[i, :len(d)] = torch.tensor([bos] + d[:-1])
        y[i, :len(d)] = torch.tensor(d)
        doc_ids[i, :len(d)] = 0
    table = torch.tensor(token_byte_lengths(sp))
    held = HeldOut(input_ids=x, labels=y, doc_ids=doc_ids, positions=positions_in_document(doc_ids),
                   target_bytes=torch.where(y == IGNORE_INDEX, 0, table[y.clamp(min=0)]), manifest="docs")
    res = evaluate_windows(model, held, micro_batch_size=2)
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert res.bytes == nbytes  # the tokenizer is lossless: token bytes are the text's bytes
    assert r["word_perplexity"] == pytest.approx(math.exp(res.loss_sum / words), rel=1e-4)
    assert r["byte_perplexity"] == pytest.approx(math.exp(res.loss_sum / nbytes), rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(res.summary()["bpb"], rel=1e-4)


ASSERT = {"trainer": assert_trainer, "trainer-lm": assert_trainer_lm, "peft-lora": assert_peft_lora,
          "text-generation": assert_text_generation, "fill-mask": assert_fill_mask, "lm-eval": assert_lm_eval}
EXPORTS = ("mega/causal", "mega/masked", "megalodon/causal")  # the exports fixture's


def _cases(version):
    return [pytest.param(c.name, export, id=f"{c.name}-{export.replace('/', '-')}") for c in CLIENTS
            for export in EXPORTS if c.applies(*export.split("/")) and version in c.versions]


def _check(results, exports, name, export):
    r = results[f"{name}/{export}"]
    assert "error" not in r, r.get("error")
    ASSERT[name](r, *exports[export])


@pytest.mark.parametrize("name,export", _cases("4.57"))
def test_client_transformers_4(results_4, exports, name, export):
    _check(results_4, exports, name, export)


@pytest.mark.slow
@pytest.mark.parametrize("name,export", _cases("5.x"))
def test_client_transformers_5(results_5, exports, name, export):
    _check(results_5, exports, name, export)


def test_one_list_for_card_checks_and_tests():
    """Every CLIENTS entry has its check and its assertions, names a known version, and is a test in each."""
    from tests.hf import clients_check
    names = [c.name for c in CLIENTS]
    assert sorted(names) == sorted(clients_check.CHECKS) == sorted(ASSERT)
    for c in CLIENTS:
        assert c.versions and set(c.versions) <= {"4.57", "5.x"} and set(c.tasks) <= {"causal", "masked"}
        assert c.families and set(c.families) <= set(FAMILIES)
        assert "PATH_OR_REPO" in c.command and c.lang in ("python", "bash")
    # every family's causal export has clients (Megalodon: no masked LM, no classification head)
    assert {c.name for c in CLIENTS if c.applies("megalodon", "causal")} == set(names) - {"trainer", "fill-mask"}


def test_card_states_what_works_with_the_commands(exports):
    """The exported README.md (written by megatrain.export) has the Works with section: each client of its family
    and task, the transformers versions it is tested in, its command and files, and the family's LoRA target module
    names."""
    for name, (folder, _, _) in exports.items():
        family, task = name.split("/")
        card = open(os.path.join(folder, "README.md")).read()
        section = card[card.index("## Works with"):card.index("## Config")]
        for c in CLIENTS:
            if c.applies(family, task):
                row = next(line for line in section.splitlines() if line.startswith(f"| {c.title} |"))
                for v in ("4.57", "5.x"):
                    assert (f"transformers {v}" in row) == (v in c.versions), row
                assert c.command_for(family).rstrip() in section and all(text in section for _, text in c.files)
            else:
                assert c.command_for(family).rstrip() not in section
        if task == "causal":
            targets = LORA_TARGETS[family]
            assert "PEFT LoRA target modules: " + ", ".join(f"`{t}`" for t in targets) in section
            assert f"target_modules={list(targets)!r}" in section


def test_card_text_follows_the_list(monkeypatch):
    """The section is generated from CLIENTS: a client marked 4.57-only reads so in the card."""
    import dataclasses
    from megatrain.export import card
    only4 = tuple(dataclasses.replace(c, versions=("4.57",)) if c.name == "lm-eval" else c for c in card.CLIENTS)
    monkeypatch.setattr(card, "CLIENTS", only4)
    row = next(line for line in card.works_with("causal").splitlines() if line.startswith("| lm-evaluation"))
    assert row.endswith("| transformers 4.57 |")
