"""--verify: reload an export with transformers and compare its logits and tokenizer ids with the run's.

    from megatrain.export.verify import verify
    problems = verify("hf_out", model, tok_dir)      # [] = logits within 1e-5, a causal LM's greedy generate
                                                     # (with the cache) megatrain.generate's, the same tokenizer
                                                     # ids (a masked LM's folder: "<mask>" in text is its id)
    problems = verify("hf_out", model, tok_dir, remote_code=False)   # a --native folder: transformers' own classes
Tests: PYTHONPATH=. python -m pytest -q tests/export/test_export.py
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatrain.hf.remote_code import DTYPES

# --verify's tokenizer probes: unicode, whitespace runs, tabs/newlines, code, text that spells special tokens
PROBES = ["Hello, world!", "  leading and  double  spaces\tand\ttabs\n\nnew lines ", "naïve café — 東京 🚀 ∑x²",
          "def f(x):\n    return {'a': [1, 2]}  # code\n", "<s> </s> <pad> <mask> are plain text here", "",
          "ЁЖЗ ελληνικά עברית"]


def specials_in_text(task: str) -> bool:
    """Whether the folder's tokenizer maps text that spells a special piece ("<mask>") to its id: a masked LM's
    does (pipeline("fill-mask")), a causal LM's tokenizes it as text, as sentencepiece does."""
    return task == "masked"


# new tokens of --verify's greedy generate (from a prompt that ends inside the second chunk: the cache carries the
# states and the current chunk's keys/values over a chunk boundary)
NEW_TOKENS = 8


def verify(out: str, model, tok_dir: Optional[str], dtype: str = "fp32", tol: float = 1e-5,
           remote_code: bool = True) -> list[str]:
    """Reload `out` with transformers here (remote code; natively too where 4.x has MEGA and the config allows;
    remote_code=False: natively only) and compare with megatrain's forward (and a causal LM's greedy generate, remote
    code); the folder's AutoTokenizer ids with those of the sentencepiece model in `tok_dir` (the run's tokenizer)
    on PROBES. Returns the problems."""
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
    loads = [("remote code", dict(trust_remote_code=True))] if remote_code else []
    with open(os.path.join(out, "config.json")) as f:
        if json.load(f)["model_type"] == "mega" and hasattr(transformers, "MegaConfig"):
            loads.append(("native", {}))
    for name, kw in loads:
        hf = auto.from_pretrained(out, dtype=torch.float32, **kw).eval()
        n = x if name != "native" or not model.config.use_chunking else x[:, :2 * model.config.chunk_size]
        fwd = dict(use_cache=False) if name == "native" and task == "causal" else {}
        with torch.no_grad():
            got = hf(n, **fwd).logits
            # megatrain on the same input: a masked LM sees the whole input (bidirectional EMA, attention within a
            # chunk), so its logits on a prefix are not a prefix of its logits on the whole input
            ref_n = want if n.shape[1] == x.shape[1] else ref(n).logits
        diff = (got - ref_n).abs().max().item()
        if not diff <= tol:
            problems.append(f"{name} logits differ from megatrain's by {diff:.3g} (> {tol})")
        if name == "remote code" and task == "causal":
            problems += _check_generate(hf, ref, x[:1, :(model.config.chunk_size + 3 if model.config.use_chunking
                                                         else 11)])
    if not loads:
        problems.append("nothing loaded the folder (no remote code, and this transformers has no native class)")
    if tok_dir:
        from megatrain.data.tokenizer import hf_encode, load_tokenizer
        sp = load_tokenizer(tok_dir)
        special = specials_in_text(task)
        # two readers of the folder: transformers 4.x's AutoTokenizer rebuilds the fast tokenizer from
        # tokenizer.model (add_prefix_space set => from_slow), 5.x reads tokenizer.json as it is; check both
        toks = [("AutoTokenizer", transformers.AutoTokenizer.from_pretrained(out))]
        if os.path.isfile(os.path.join(out, "tokenizer.json")):
            toks.append(("tokenizer.json", transformers.PreTrainedTokenizerFast(
                tokenizer_file=os.path.join(out, "tokenizer.json"), split_special_tokens=not special)))
        for name, tok in toks:
            for s in PROBES:
                a, b = tok(s, add_special_tokens=False)["input_ids"], hf_encode(sp, s, special)
                if a != b:
                    problems.append(f"tokenizer ids differ from sentencepiece ({name}) on {s!r}: {a[:8]}... vs "
                                    f"{b[:8]}...")
                    break
    return problems


def _check_generate(hf, ref, prompt: torch.Tensor) -> list[str]:
    """transformers' greedy generate (its cache) against megatrain.generate on one prompt, up to the end token."""
    from megatrain.model.generate import generate
    eos = ref.config.eos_token_id
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                          attention_mask=torch.ones_like(prompt))[0].tolist()
        want = generate(ref, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=eos)[0].tolist()
    if eos in want[prompt.shape[1]:]:  # transformers stops at the end token (megatrain pads after it)
        want = want[:want.index(eos, prompt.shape[1]) + 1]
    if got != want:
        return [f"remote code greedy generate differs from megatrain.generate: {got[prompt.shape[1]:]} vs "
                f"{want[prompt.shape[1]:]}"]
    return []
