"""A training checkpoint -> a Hugging Face folder that loads, generates and fine-tunes in transformers 4.x and 5.x.

    from megatrain.export import export, ExportError
    info = export("runs/x", "hf_out", tokenizer=None, do_verify=True)   # CLI: launch/export_hf.py
    info = export("runs/x", "hf_out", native=True)     # MEGA only: a folder for transformers 4.57's own classes
Tests: PYTHONPATH=. python -m pytest -q tests/export/test_export.py

The steps, one file each: the checkpoint as a plain model (load.py), the model files and remote code
(megatrain.hf.remote_code.save_remote), the tokenizer, the model card (card.py), --verify (verify.py), the Hub
(check_hub / push, below). The folder: config.json (model_type mega or megalodon, architectures, auto_map),
model.safetensors (the key map's names), generation_config.json, the tokenizer (tokenizer.model + tokenizer.json
...), README.md (model card) and the run's family's remote code (megatrain/hf/remote_code.py). `native`: config.json
+ weights for transformers' own classes, no remote code -- only where those classes compute the model (MEGA in
4.57; never Megalodon, which transformers does not have). Every input is checked before any work (ExportError: one
line); everything is written into a temporary sibling folder, verified if asked, and renamed to OUT at the end.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from megatrain.config import ConfigError, load_config
from megatrain.data.tokenizer import load_tokenizer, save_hf_tokenizer, tokenizer_sha256
from megatrain.export.card import model_card
from megatrain.export.load import load_model
from megatrain.export.verify import specials_in_text, verify
from megatrain.hf.format import FORMATS, save_hf
from megatrain.hf.remote_code import DTYPES, save_remote
from megatrain.io import replace_folder
from megatrain.train.checkpoint import LATEST, read_latest

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
    cfg: object = None  # its run config (config.yaml)


def resolve_checkpoint(path: str) -> Checkpoint:
    """A run folder, its checkpoints/ folder, or one tag folder -> the tag folder to export."""
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
    try:
        cfg = load_config(os.path.join(path, "config.yaml"))
    except (ConfigError, ValueError) as e:
        raise ExportError(f"CHECKPOINT {path}/config.yaml: {e}") from None
    if not has_model or (cfg.parallel.zero_stage > 0 and not has_optim):
        raise ExportError(f"CHECKPOINT {path}: incomplete checkpoint (model or ZeRO optimizer state files "
                          "missing); export a complete one")
    ckpt_dir = os.path.dirname(path)
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ""
    return Checkpoint(path, run_dir, cfg)


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
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(index)))}
    if run_dir:
        roots.add(os.path.dirname(run_dir))
    for root in sorted(roots):
        for cand in sorted(glob.glob(os.path.join(root, "*", "tokenizer.model"))):
            if tokenizer_sha256(cand) == sha:
                return os.path.dirname(cand)
    return None


def check_tokenizer(tok_dir: str, vocab_size: int) -> None:
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


def check_native(cfg, native: bool) -> None:
    """--native needs transformers' own classes to compute this run's model (the family's native_problem)."""
    why = FORMATS[cfg.model.model_type].native_problem(cfg.model) if native else None
    if why:
        raise ExportError(f"--native: {why}; export without --native (the remote-code folder, "
                          "trust_remote_code=True)")


def write_folder(model, cfg, ckpt: Checkpoint, tmp: str, tok_dir: Optional[str], dtype: str,
                 native: bool = False) -> dict:
    task = "causal" if model.config.is_decoder else "masked"
    if native:
        save_hf(model if dtype == "fp32" else model.to(DTYPES[dtype]), tmp, native=True)
        why = None
    else:
        why = save_remote(model, tmp, dtype)
    if tok_dir:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copy2(os.path.join(tok_dir, name), tmp)
        if specials_in_text(task) or not os.path.exists(os.path.join(tmp, "tokenizer.json")):
            # a bare sentencepiece model: add HF files; a masked LM: files that map a spelled "<mask>" to its id
            save_hf_tokenizer(tmp, specials_in_text(task))
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(cfg, ckpt.tag_dir, ckpt.run_dir, task, why, dtype, native=native))
    return {"task": task, "family": cfg.model.model_type, "native": why is None, "why_not_native": why,
            "remote_code": not native}


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
           push_to_hub: Optional[str] = None, private: bool = False, native: bool = False) -> dict:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = os.path.abspath(out)
    check_out(out, overwrite)
    ckpt = resolve_checkpoint(checkpoint)
    check_native(ckpt.cfg, native)
    if push_to_hub:
        check_hub(push_to_hub)
    try:
        model, cfg = load_model(ckpt.tag_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(f"CHECKPOINT {e}") from None  # the message names the folder
    tok_dir = run_tok = None
    if not no_tokenizer:
        run_tok = find_tokenizer(cfg, ckpt.run_dir)
        tok_dir = tokenizer or run_tok
        if tok_dir is None:
            raise ExportError("no tokenizer found (data.tokenizer is unset and no folder next to the shards has the "
                              "manifest's tokenizer); pass --tokenizer DIR, or --no-tokenizer to export without one")
        check_tokenizer(tok_dir, model.config.vocab_size)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        info = write_folder(model, cfg, ckpt, tmp, tok_dir, dtype, native)
        if do_verify:
            # the ids must be the run's: a --tokenizer other than the one the run was trained with is a mismatch
            ref_tok = run_tok if run_tok and os.path.isfile(os.path.join(run_tok, "tokenizer.model")) else tok_dir
            problems = verify(tmp, model, ref_tok if tok_dir else None, dtype, remote_code=not native)
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
