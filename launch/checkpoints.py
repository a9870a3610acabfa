"""Look after a run's checkpoints: list, verify checksums, prune, convert to DeepSpeed's universal format.

    python launch/checkpoints.py RUN ls                 # tag, step, tokens, files, size, layout; `latest` marked
    python launch/checkpoints.py RUN verify [TAG ...]   # sizes and xxh3-64 checksums against each manifest
    python launch/checkpoints.py RUN prune --keep N [--dry-run]   # the N newest stay (and `latest`, always)
    python launch/checkpoints.py RUN to-universal [TAG] # TAG/universal/ (default: latest): resume on another layout

RUN is a run folder (its checkpoints/, or the checkpoint.dir of its config.yaml) or a checkpoint folder itself.
verify exits 1 when a checkpoint does not match its manifest (one line per tag, naming the file); bad input (no
such folder, no checkpoints, an unknown tag) is one line, exit 2. See megatrain/train/checkpoint.py.
"""
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # DeepSpeed's conversion progress bars
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser, run  # noqa: E402
from megatrain.train.checkpoint import (LATEST, step_tags, describe, prune, read_latest,  # noqa: E402
                                        to_universal, verify)


def checkpoint_dir(path: str) -> str:
    """RUN -> the folder holding the step tags (ValueError naming RUN when there is none)."""
    if not os.path.isdir(path):
        raise ValueError(f"RUN {path}: no such folder")
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(cand) and (step_tags(cand) or os.path.exists(os.path.join(cand, LATEST))):
            return cand
    cfg = os.path.join(path, "config.yaml")
    if os.path.exists(cfg):
        from megatrain.config import load_config
        d = load_config(cfg).checkpoint_dir
        if os.path.isdir(d):
            return d
    raise ValueError(f"RUN {path}: no checkpoints (no step######## folders in it or in its checkpoints/)")


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main(argv=None) -> int:
    p = ArgumentParser(prog="checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint folder")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the checkpoints")
    v = sub.add_parser("verify", help="check sizes and checksums")
    v.add_argument("tags", nargs="*", help="tags to verify (default: all)")
    pr = sub.add_parser("prune", help="delete the oldest checkpoints")
    pr.add_argument("--keep", type=int, required=True, help="how many of the newest to keep (latest always stays)")
    pr.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    u = sub.add_parser("to-universal", help="make TAG/universal/ (DeepSpeed's universal checkpoint)")
    u.add_argument("tag", nargs="?", help="default: the tag `latest` names")
    a = p.parse_args(argv)
    d = checkpoint_dir(a.run)
    tags = step_tags(d)[::-1]
    latest = read_latest(d)

    def known(tag):
        if tag not in tags:
            raise ValueError(f"TAG {tag}: not a checkpoint in {d} (there: {', '.join(tags) or 'none'})")
        return os.path.join(d, tag)

    if a.command == "ls":
        print(f"{'tag':<14} {'step':>8} {'tokens':>14} {'files':>5} {'size':>10}  layout")
        for t in tags:
            info = describe(os.path.join(d, t))
            lay = info["layout"] or {}
            layout = " ".join(f"{k}={v}" for k, v in lay.items()) if lay else "(no manifest: incomplete)"
            print(f"{t:<14} {info['step'] if info['step'] is not None else '?':>8} "
                  f"{info['tokens'] if info['tokens'] is not None else '?':>14} "
                  f"{info['files'] if info['files'] is not None else '?':>5} {_size(info['bytes']):>10}  {layout}"
                  + ("  <- latest" if t == latest else ""))
        return 0
    if a.command == "verify":
        bad = 0
        for t in a.tags or tags:
            why = verify(known(t), checksums=True)
            print(f"{t}: {'ok' if why is None else why}")
            bad += why is not None
        return 1 if bad else 0
    if a.command == "prune":
        if a.keep < 1:
            raise ValueError(f"--keep {a.keep}: must be >= 1")
        gone = prune(d, a.keep, latest, dry_run=a.dry_run)
        print(("would delete: " if a.dry_run else "deleted: ") + (", ".join(gone) or "nothing"))
        return 0
    tag = a.tag or latest
    if tag is None:
        raise ValueError(f"{d}: no `latest`: name the TAG to convert")
    print(to_universal(known(tag)))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "checkpoints"))
