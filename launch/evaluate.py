"""Evaluate a model on held-out data: loss / perplexity / bits per byte per length, by position, passkey retrieval.

    python launch/evaluate.py SOURCE --shards HELDOUT [--seq-len 4096,16384,65536] [--tokens N] [--positions]
           [--passkey [--passkey-lengths a,b] [--passkey-trials T]] [--out results.json] [--plot DIR]
    torchrun --nproc_per_node 4 launch/evaluate.py SOURCE --shards H --sp 2 ...     # DP x SP (also deepspeed)

SOURCE: a run folder, its checkpoints/ folder, one checkpoint tag folder (any model family), a megatrain export
(MEGA or Megalodon) or a transformers 4.57 MEGA folder (config.json + weights). HELDOUT: a held-out manifest (data_tools/build_shards.py
--heldout-fraction F writes OUT/heldout/index.json). --seq-len: default the run's data.seq_len (else 4096); each a
multiple of chunk_size x --sp. --no-doc-reset: documents packed in one window see each other (as a plain
transformers forward does). --plot DIR: loss_by_position.png (--positions) and passkey.png (--passkey). The
results JSON is described in megatrain/eval/standalone.py. Bad input (missing shards, a bad length, an unknown
SOURCE): one line on stderr, exit 2, before any work, from rank 0 only.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run folder, checkpoint, megatrain export (MEGA, Megalodon), or a transformers "
                                  "(MEGA or any causal LM) folder")
    p.add_argument("--shards", required=True, help="held-out manifest (index.json or its folder)")
    p.add_argument("--seq-len", default=None, help="comma-separated evaluation lengths")
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens per length (whole windows)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--positions", action="store_true", help="loss by position (log-spaced bins)")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval accuracy by length and depth")
    p.add_argument("--passkey-lengths", default=None, help="comma-separated (default: --seq-len)")
    p.add_argument("--passkey-trials", type=int, default=10)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --passkey (default: found with SOURCE)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks per window (divides the world)")
    p.add_argument("--no-doc-reset", action="store_true", help="do not reset state at document boundaries")
    p.add_argument("--out", default=None, help="results JSON (default: print only)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write the PNGs here")
    return p.parse_args(argv)


def _ints(text: str, flag: str) -> list:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers such as 4096,16384") from None
    if not vals:
        raise ValueError(f"{flag} {text!r}: expected at least one length")
    return vals


def load_source(source: str):
    """(model in eval mode, run Config or None, folder to look for a tokenizer in)."""
    path = os.path.abspath(source)
    if not os.path.isdir(path):
        raise ValueError(f"SOURCE {source}: no such folder")
    from megatrain.hf.causal_lm import CausalLMAdapter, is_transformers_causal_lm
    if is_transformers_causal_lm(path):  # any other transformers causal LM, behind megatrain's LM API
        return CausalLMAdapter.from_pretrained(path), None, path
    if os.path.isfile(os.path.join(path, "config.json")):  # megatrain export (any family) or transformers MEGA folder
        from megatrain.hf import load_hf
        return load_hf(path, task="causal"), None, path
    from megatrain.export.folder import ExportError, resolve_checkpoint
    try:
        ckpt = resolve_checkpoint(path)
    except ExportError as e:
        raise ValueError(str(e).replace("CHECKPOINT", "SOURCE", 1) + "; expected a run folder, a checkpoint, a "
                         "megatrain export or a transformers MEGA folder") from None
    from megatrain.export.load import load_model
    model, cfg = load_model(ckpt.tag_dir)
    return model, cfg, ckpt.run_dir or ckpt.tag_dir


def _tokenizer_dir(a, cfg, where):
    if a.tokenizer:
        return a.tokenizer
    if os.path.isfile(os.path.join(where, "tokenizer.model")):
        return where
    if cfg is not None:
        from megatrain.export.folder import find_tokenizer
        return find_tokenizer(cfg, where)
    return None


def main(argv=None) -> int:
    from megatrain.parallel.env import discover
    env = discover()
    quiet = env.rank != 0
    try:
        a = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return _main(a, env)
    except (ValueError, OSError) as e:  # bad input: one line, rank 0 only
        if not quiet:
            print(f"evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2


def _main(a, env) -> int:
    from megatrain.data.shards import Manifest
    from megatrain.eval.passkey import PasskeyFormat
    from megatrain.eval.standalone import check_lengths
    # every check before any heavy work
    for flag, v in (("--tokens", a.tokens), ("--micro-batch-size", a.micro_batch_size),
                    ("--passkey-trials", a.passkey_trials), ("--sp", a.sp)):
        if v < 1:
            raise ValueError(f"{flag} {v}: expected a positive number")
    from megatrain.hf.causal_lm import is_transformers_causal_lm
    if a.sp > 1 and is_transformers_causal_lm(os.path.abspath(a.source)):
        raise ValueError(f"--sp {a.sp}: SOURCE {a.source} is a transformers model, evaluated one window per rank "
                         f"(sequence parallelism hands MEGA's EMA state across ranks); use --sp 1")
    if env.world_size % a.sp:
        raise ValueError(f"--sp {a.sp}: must divide the world size {env.world_size}")
    try:
        Manifest.load(a.shards)
    except ValueError as e:
        raise ValueError(f"--shards {a.shards}: {e}") from None
    model, cfg, where = load_source(a.source)
    seq_lens = _ints(a.seq_len, "--seq-len") if a.seq_len else [cfg.data.seq_len if cfg else 4096]
    check_lengths(seq_lens, model.config, a.sp)
    pk_lengths = _ints(a.passkey_lengths, "--passkey-lengths") if a.passkey_lengths else None
    if pk_lengths and a.sp > 1:  # under SP a passkey context is sliced like a window
        check_lengths(pk_lengths, model.config, a.sp, "--passkey-lengths")
    fmt = None
    if a.passkey:
        tok = _tokenizer_dir(a, cfg, where)
        if not tok:
            raise ValueError(f"--passkey: no tokenizer found with SOURCE {a.source}; pass --tokenizer DIR")
        from megatrain.data.tokenizer import load_tokenizer
        fmt = PasskeyFormat.from_tokenizer(load_tokenizer(tok))
        for L in pk_lengths or seq_lens:
            fmt.prompt(L, 0.0, "12345")  # a length too short for the question fails now
    reset = (not a.no_doc_reset) and (cfg.data.reset_at_doc_boundaries if cfg else True)

    import torch
    import torch.distributed as dist
    from megatrain.eval.standalone import evaluate_model
    groups = None
    if env.world_size > 1:
        from megatrain.parallel.env import init_process_group
        from megatrain.parallel.groups import ParallelGroups
        init_process_group(env, "auto")
        groups = ParallelGroups(dp_size=env.world_size // a.sp, sp_size=a.sp)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    try:
        res = evaluate_model(model, a.shards, seq_lens, a.tokens, a.micro_batch_size, positions=a.positions,
                             passkey_format=fmt, passkey_lengths=pk_lengths, passkey_trials=a.passkey_trials,
                             reset_at_doc_boundaries=reset,
                             **({} if groups is None else dict(sp_group=groups.sp_group, dp_rank=groups.dp_rank,
                                                               dp_size=groups.dp_size)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.rank != 0:
        return 0
    res["source"] = a.source
    if a.plot:
        from megatrain.eval.plots import plot_passkey, plot_positions
        res["plots"] = {}
        if a.positions:
            res["plots"]["by_position"] = plot_positions(res["by_position"], os.path.join(a.plot, "loss_by_position.png"))
        if a.passkey:
            res["plots"]["passkey"] = plot_passkey(res["passkey"], os.path.join(a.plot, "passkey.png"))
    for r in res["rows"]:
        bpb = f" | bpb {r['bpb']:.4f}" if r["bpb"] is not None else ""
        print(f"seq_len {r['seq_len']} | loss {r['loss']:.4f} | ppl {r['ppl']:.2f}{bpb} | tokens {r['tokens']} | "
              f"{r['tokens_per_s']:.0f} tok/s")
    for r in res.get("passkey", []):
        print(f"passkey length {r['length']} depth {r['depth']:g}: {r['accuracy']:.2f} ({r['trials']} trials)")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from megatrain.parallel.env import exit_process
    exit_process(main())
