"""Export a megatrain checkpoint as a Hugging Face folder (transformers 4.x and 5.x), optionally verify and push it.

    python launch/export_hf.py CHECKPOINT OUT [--tokenizer DIR | --no-tokenizer] [--verify] [--overwrite]
                               [--dtype fp32|bf16] [--native] [--push-to-hub REPO [--private]]
    python launch/export_hf.py runs/x hf_out/ --verify       # a run folder, its checkpoints/, or one tag folder

Any model family (model.model_type: mega, megalodon). OUT gets config.json (+ auto_map), model.safetensors,
generation_config.json, the tokenizer, a README model card and the family's megatrain model code as remote code
(load with trust_remote_code=True; a MEGA folder also natively in transformers 4.57 where it computes the same;
transformers has no Megalodon). --native (MEGA only): a folder for transformers 4.57's own MEGA classes, no remote
code; refused where they would compute something else, and for Megalodon. See megatrain/export/. Bad input: one
line on stderr, exit 2, nothing written. --verify mismatch: exit 1, nothing written.
"""
import argparse
import os
import sys

# DeepSpeed's shard-merging progress bars are not messages: stderr carries only the result or one error line
os.environ.setdefault("TQDM_DISABLE", "1")
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.export import ExportError, export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder (their latest), or one tag folder")
    p.add_argument("out", help="output folder (written through a temporary folder, renamed at the end)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the run's)")
    tok.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    p.add_argument("--verify", action="store_true",
                   help="reload with transformers; compare logits (<= 1e-5) and tokenizer ids")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights dtype")
    p.add_argument("--native", action="store_true",
                   help="MEGA only: a folder for transformers 4.57's own MEGA classes (no remote code)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    a = p.parse_args(argv)
    if a.private and not a.push_to_hub:
        p.error("--private needs --push-to-hub")
    try:
        info = export(a.checkpoint, a.out, tokenizer=a.tokenizer, no_tokenizer=a.no_tokenizer,
                      overwrite=a.overwrite, dtype=a.dtype, do_verify=a.verify, push_to_hub=a.push_to_hub,
                      private=a.private, native=a.native)
    except ExportError as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"exported {info['checkpoint']} -> {info['out']}" + (
        " (native: transformers' own classes, no remote code)" if not info["remote_code"] else
        "" if info["native"] else f" (remote code only: {info['why_not_native']})"))
    if a.verify:
        print("verified: logits" + (" and tokenizer ids" if info["tokenizer"] else "") + " match"
              + ("; greedy generate matches" if info["remote_code"] and info["task"] == "causal" else ""))
    if info.get("url"):
        print(f"pushed to {info['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
