"""A training checkpoint -> a Hugging Face folder that loads, generates and fine-tunes in transformers 4.x and 5.x.

    from megatrain.convert.export import export, ExportError
    info = export("runs/x", "hf_out", tokenizer=None, verify=True)   # CLI: launch/export_hf.py
Tests: PYTHONPATH=. python -m pytest -q tests/convert/test_export.py

The folder: config.json (model_type mega, architectures, auto_map), model.safetensors (transformers' names),
generation_config.json, the tokenizer (tokenizer.model + tokenizer.json ...), README.md (model card) and the
remote code (megatrain/convert/remote_code.py). Every input is checked before any work (ExportError: one line);
everything is written into a temporary sibling folder, verified if asked, and renamed to OUT at the end.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from megatrain.convert.hf import REMOTE_ONLY_MODEL_TYPE, native_problem, save_hf
from megatrain.convert.remote_code import auto_map, write_remote_code
from megatrain.io import replace_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# --verify's tokenizer probes: unicode, whitespace runs, tabs/newlines, code, text that spells special tokens
PROBES = ["Hello, world!", "  leading and  double  spaces\tand\ttabs\n\nnew lines ", "naïve café — 東京 🚀 ∑x²",
          "def f(x):\n    return {'a': [1, 2]}  # code\n", "<s> </s> <pad> <mask> are plain text here", "",
          "ЁЖЗ ελληνικά עברית"]


class ExportError(ValueError):
    """A bad export input: the message is one line naming what and what is expected (exit 2)."""

    exit_code = 2


class ExportCheckFailed(ExportError):
    """--verify found a mismatch, or the upload failed (exit 1)."""

    exit_code = 1


@dataclass
class Checkpoint:
    tag_dir: str      # the checkpoint tag folder (config.yaml, DeepSpeed files)
    run_dir: str      # the run folder (metrics.jsonl, config.yaml), "" if unknown


def resolve_checkpoint(path: str) -> Checkpoint:
    """A run folder, its checkpoints/ folder, or one tag folder -> the tag folder to export."""
    from megatrain.train.checkpoint import LATEST, read_latest
    path = os.path.normpath(os.path.abspath(path))
    if not os.path.isdir(path):
        raise ExportError(f"CHECKPOINT {path}: no such folder")
    if not os.path.exists(os.path.join(path, LATEST)) and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")  # a run folder
    if os.path.exists(os.path.join(path, LATEST)):
        try:
            tag = read_latest(path)
        except FileNotFoundError as e:
            raise ExportError(f"CHECKPOINT {path}: {e}") from None
        path = os.path.join(path, tag)
    if not os.path.exists(os.path.join(path, "config.yaml")):
        raise ExportError(f"CHECKPOINT {path}: not a megatrain run, checkpoints folder or checkpoint "
                          "(no 'latest' and no config.yaml)")
    files = os.listdir(path)
    has_model = "mp_rank_00_model_states.pt" in files or any(f.endswith("_model_states.pt") for f in files)
    has_optim = any(f.endswith("_optim_states.pt") for f in files)
    from megatrain.config import ConfigError, load_config
    try:
        cfg = load_config(os.path.join(path, "config.yaml"))
    except (ConfigError, ValueError) as e:
        raise ExportError(f"CHECKPOINT {path}/config.yaml: {e}") from None
    if not has_model or (cfg.parallel.zero_stage > 0 and not has_optim):
        raise ExportError(f"CHECKPOINT {path}: incomplete checkpoint (model or ZeRO optimizer state files "
                          "missing); export a complete one")
    ckpt_dir = os.path.dirname(path)
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ""
    return Checkpoint(path, run_dir)


def find_tokenizer(cfg, run_dir: str) -> Optional[str]:
    """The run's tokenizer folder: data.tokenizer, else a folder near the shards (or the run) whose
    tokenizer.model has the manifest's tokenizer_sha256."""
    if cfg.data.tokenizer:
        t = cfg.data.tokenizer
        return os.path.dirname(t) if os.path.isfile(t) else t
    shards = cfg.data.shards if isinstance(cfg.data.shards, str) else (cfg.data.shards or [""])[0]
    index = shards if shards.endswith(".json") else os.path.join(shards, "index.json")
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        sha = json.load(f).get("tokenizer_sha256", "")
    if not sha:
        return None
    from megatrain.data.tokenizer import tokenizer_sha256
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(index)))}
    if run_dir:
        roots.add(os.path.dirname(run_dir))
    for root in sorted(roots):
        for cand in sorted(glob.glob(os.path.join(root, "*", "tokenizer.model"))):
            if tokenizer_sha256(cand) == sha:
                return os.path.dirname(cand)
    return None


def check_tokenizer(tok_dir: str, vocab_size: int) -> None:
    from megatrain.data.tokenizer import load_tokenizer
    try:
        sp = load_tokenizer(tok_dir)
    except ValueError as e:
        raise ExportError(f"--tokenizer: {e}") from None
    if sp.get_piece_size() != vocab_size:
        raise ExportError(f"tokenizer {tok_dir}: {sp.get_piece_size()} pieces, but the model's vocab_size is "
                          f"{vocab_size}; give the run's tokenizer with --tokenizer DIR")


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"OUT {out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"OUT {out}: not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"OUT {out}: parent folder {parent} does not exist")


def model_card(cfg, ckpt: Checkpoint, task: str, why_not_native: Optional[str], dtype: str) -> str:
    import yaml
    metrics = os.path.join(ckpt.run_dir, "metrics.jsonl") if ckpt.run_dir else ""
    last = {}
    if metrics and os.path.exists(metrics):
        from megatrain.train.metrics import read_metrics
        recs = read_metrics(metrics)
        last = recs[-1] if recs else {}
    auto = "AutoModelForCausalLM" if task == "causal" else "AutoModelForMaskedLM"
    native = ("transformers 4.57.x also loads it natively (without `trust_remote_code`), with the same logits; "
              "its native MEGA has no `generate()` and needs lengths that are a multiple of chunk_size."
              if not why_not_native else
              f"**Not loadable natively**: {why_not_native}, so this folder has model_type "
              f"`{REMOTE_ONLY_MODEL_TYPE}` and needs `trust_remote_code=True` everywhere.")
    model_yaml = yaml.safe_dump({k: v for k, v in cfg.model.to_dict().items()}, sort_keys=True)
    return f"""---
library_name: transformers
tags: [mega, megatrain, long-context]
---
# MEGA ({task} LM) trained with megatrain

Moving Average Equipped Gated Attention (Ma et al., arXiv 2209.10655), pretrained with
[megatrain](https://github.com/) and exported from `{os.path.basename(ckpt.tag_dir)}`.

| | |
|---|---|
| objective | {cfg.train.objective} |
| data | `{cfg.data.shards}` (windows of {cfg.data.seq_len} tokens) |
| steps | {last.get('step', 'unknown')} |
| tokens | {last.get('tokens', 'unknown')} |
| final loss | {last.get('loss', 'unknown')} |
| weights | {dtype} |

## Load

transformers 4.x and 5.x (MEGA was removed from transformers in 5.0; this folder ships megatrain's own model code):

```python
from transformers import AutoTokenizer, {auto}
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)  # 5.x reads config.json too
model = {auto}.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
{"ids = model.generate(tok('Hello', return_tensors='pt').input_ids, max_new_tokens=20)" if task == "causal" else
 "logits = model(**tok('Hello <mask>', return_tensors='pt')).logits"}
```
Fine-tune with `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`,
`AutoModelForQuestionAnswering` or `AutoModelForMultipleChoice` (also `trust_remote_code=True`).
Any input length works; generation carries the EMA state and the current chunk's keys/values.

{native}

## Config

```yaml
{model_yaml}```
"""


def write_model_files(model, tmp: str, dtype: str = "fp32") -> Optional[str]:
    """The model part of an export: config.json (+ auto_map, dtype), model.safetensors, generation_config.json
    and the remote code. Returns why transformers 4.x must not load it natively (None: it may)."""
    why = native_problem(model.config)
    if dtype != "fp32":
        model = model.to(DTYPES[dtype])
    save_hf(model, tmp, native=False)
    with open(os.path.join(tmp, "config.json")) as f:
        d = json.load(f)
    d["auto_map"] = auto_map("MegatrainMegaConfig" if why else "MegaConfig")
    d["torch_dtype"] = d["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    c = model.config
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
           "_from_model_config": True}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    write_remote_code(tmp)
    return why


def write_folder(model, cfg, ckpt: Checkpoint, tmp: str, tok_dir: Optional[str], dtype: str) -> dict:
    task = "causal" if model.config.is_decoder else "masked"
    why = write_model_files(model, tmp, dtype)
    if tok_dir:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copy2(os.path.join(tok_dir, name), tmp)
        if not os.path.exists(os.path.join(tmp, "tokenizer.json")):  # a bare sentencepiece model: add HF files
            from megatrain.data.tokenizer import save_hf_tokenizer
            save_hf_tokenizer(tmp)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(cfg, ckpt, task, why, dtype))
    return {"task": task, "native": why is None, "why_not_native": why}


def verify(out: str, model, tok_dir: Optional[str], dtype: str = "fp32", tol: float = 1e-5) -> list[str]:
    """Reload `out` with transformers here (remote code; natively too where 4.x has MEGA and the config allows)
    and compare with megatrain's forward; the folder's AutoTokenizer ids with those of the sentencepiece model in
    `tok_dir` (the run's tokenizer) on PROBES. Returns the problems."""
    import transformers
    transformers.logging.set_verbosity_error()  # its notes about native MEGA classes are not results
    task = "causal" if model.config.is_decoder else "masked"
    auto = transformers.AutoModelForCausalLM if task == "causal" else transformers.AutoModelForMaskedLM
    ref = model.to(DTYPES[dtype]).float().eval()  # bf16 exports: megatrain on the same rounded weights
    g = torch.Generator().manual_seed(0)
    length = 2 * model.config.chunk_size + 3 if model.config.use_chunking else 19  # not a multiple of a chunk
    x = torch.randint(0, model.config.vocab_size, (2, length), generator=g)
    with torch.no_grad():
        want = ref(x).logits
    problems = []
    loads = [("remote code", dict(trust_remote_code=True))]
    with open(os.path.join(out, "config.json")) as f:
        if json.load(f)["model_type"] == "mega" and hasattr(transformers, "MegaConfig"):
            loads.append(("native", {}))
    for name, kw in loads:
        hf = auto.from_pretrained(out, dtype=torch.float32, **kw).eval()
        n = x if name != "native" or not model.config.use_chunking else x[:, :2 * model.config.chunk_size]
        fwd = dict(use_cache=False) if name == "native" and task == "causal" else {}
        with torch.no_grad():
            got = hf(n, **fwd).logits
        diff = (got - want[:, :n.shape[1]]).abs().max().item()
        if not diff <= tol:
            problems.append(f"{name} logits differ from megatrain's by {diff:.3g} (> {tol})")
    if tok_dir:
        from megatrain.data.tokenizer import load_tokenizer
        sp = load_tokenizer(tok_dir)
        # two readers of the folder: transformers 4.x's AutoTokenizer rebuilds the fast tokenizer from
        # tokenizer.model (add_prefix_space set => from_slow), 5.x reads tokenizer.json as it is; check both
        toks = [("AutoTokenizer", transformers.AutoTokenizer.from_pretrained(out))]
        if os.path.isfile(os.path.join(out, "tokenizer.json")):
            toks.append(("tokenizer.json", transformers.PreTrainedTokenizerFast(
                tokenizer_file=os.path.join(out, "tokenizer.json"), split_special_tokens=True)))
        for name, tok in toks:
            for s in PROBES:
                a, b = tok(s, add_special_tokens=False)["input_ids"], sp.encode(s)
                if a != b:
                    problems.append(f"tokenizer ids differ from sentencepiece ({name}) on {s!r}: {a[:8]}... vs "
                                    f"{b[:8]}...")
                    break
    return problems


def check_hub(repo: str) -> None:
    from huggingface_hub import constants, get_token
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo}: offline (HF_HUB_OFFLINE=1); unset it or export without pushing")
    if not get_token():
        raise ExportError(f"--push-to-hub {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")


def push(out: str, repo: str, private: bool) -> str:
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True, private=private)
        api.upload_folder(folder_path=out, repo_id=repo)
    except Exception as e:  # network, auth, permissions: one line; the local export stays complete
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportCheckFailed(f"--push-to-hub {repo}: upload failed ({msg}); the export in {out} is complete") from None
    return f"https://huggingface.co/{repo}"


def export(checkpoint: str, out: str, tokenizer: Optional[str] = None, no_tokenizer: bool = False,
           overwrite: bool = False, dtype: str = "fp32", do_verify: bool = False,
           push_to_hub: Optional[str] = None, private: bool = False) -> dict:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = os.path.abspath(out)
    check_out(out, overwrite)
    ckpt = resolve_checkpoint(checkpoint)
    if push_to_hub:
        check_hub(push_to_hub)
    from megatrain.convert.checkpoint import load_model
    try:
        model, cfg = load_model(ckpt.tag_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(f"CHECKPOINT {e}") from None  # the message names the folder
    tok_dir = None
    if not no_tokenizer:
        run_tok = find_tokenizer(cfg, ckpt.run_dir)
        tok_dir = tokenizer or run_tok
        if tok_dir is None:
            raise ExportError("no tokenizer found (data.tokenizer is unset and no folder next to the shards has the "
                              "manifest's tokenizer); pass --tokenizer DIR, or --no-tokenizer to export without one")
        check_tokenizer(tok_dir, model.config.vocab_size)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        info = write_folder(model, cfg, ckpt, tmp, tok_dir, dtype)
        if do_verify:
            # the ids must be the run's: a --tokenizer other than the one the run was trained with is a mismatch
            ref_tok = run_tok if run_tok and os.path.isfile(os.path.join(run_tok, "tokenizer.model")) else tok_dir
            problems = verify(tmp, model, ref_tok if tok_dir else None, dtype)
            if problems:
                raise ExportCheckFailed(f"--verify failed: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                        if len(problems) > 1 else ""))
        replace_folder(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    info.update(out=out, checkpoint=ckpt.tag_dir, tokenizer=tok_dir)
    if push_to_hub:
        info["url"] = push(out, push_to_hub, private)
    return info
