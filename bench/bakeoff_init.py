"""Why does a small causal MEGA at initializer_range 0.02 stay on the unigram plateau? Controlled variants.

Run (resumable: one JSON per finished variant in --out; --only runs some, so two processes can share the work):
    python bench/bakeoff_init.py --data shards/ --out bench/results/bakeoff-init-<date>/ [--only a,b] [--steps 300]
Each variant is the demo's MEGA shape (configs/demo.yaml: 4 layers, D 128, chunk 64, windows of 256 x 4 per step,
AdamW lr 3e-3, cosine) trained by bench/bakeoff.py's one loop on the same stream, changing ONE thing against the
default (transformers' / megatrain's initializer_range 0.02): the held-out loss (8K tokens) over training says which
parameters' initial scale keeps it on the plateau. Writes variants.json and README.md (the table).
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser  # noqa: E402

PROBE = dict(
    shape=dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, shared_representation_size=64,
               nffn_hidden_size=256, ema_projection_size=16, chunk_size=64),
    seq_len=256, windows_per_step=4, curve_points=6, curve_tokens=8192, device="cpu")
LR = 3e-3


def _normal(std_of):
    """post_build: re-draw the parameters that `std_of(name, p)` gives a std for (None: keep)."""
    import torch

    def apply(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = std_of(name, p)
                if std is not None:
                    p.normal_(0.0, std)
                    if name.endswith("word_embeddings.weight"):
                        p[3].zero_()  # the padding row, as init_weights_
    return apply


def _embedding_std(std):
    return _normal(lambda n, p: std(p.shape[1]) if n.endswith("word_embeddings.weight") else None)


def _qk_std(std):
    return _normal(lambda n, p: std if n.endswith(("qk_weight", "rel_pos.alpha", "rel_pos.beta")) else None)


def _head_dense_std(std):
    return _normal(lambda n, p: std if n == "dense.weight" else None)


# name -> (what it changes, MEGA overrides, lr, post_build)
VARIANTS = {
    "default-0.02": ("megatrain's default: initializer_range 0.02 everywhere", {}, LR, None),
    "init-0.1": ("initializer_range 0.1 everywhere (configs/demo.yaml)", {"initializer_range": 0.1}, LR, None),
    "init-rsqrtD": ("initializer_range D^-1/2 = 0.088 everywhere", {"initializer_range": 128 ** -0.5}, LR, None),
    "emb-rsqrtD": ("0.02, but the (tied) token embedding ~ N(0, 1/D)", {}, LR, _embedding_std(lambda d: d ** -0.5)),
    "emb-1": ("0.02, but the (tied) token embedding ~ N(0, 1)", {}, LR, _embedding_std(lambda d: 1.0)),
    "qk-0.1": ("0.02, but qk_weight and the rotary bias at 0.1", {}, LR, _qk_std(0.1)),
    "no-dense": ("0.02, no dense+tanh before the head (add_lm_hidden_dense_layer=False)",
                 {"add_lm_hidden_dense_layer": False}, LR, None),
    "lr-1e-2": ("0.02, lr 1e-2", {}, 1e-2, None),
    "layernorm": ("0.02, layernorm instead of scalenorm", {"normalization_type": "layernorm"}, LR, None),
    "wd-0": ("0.02, weight decay 0", {}, LR, None),
}


def run_variant(name: str, data: str, steps: int, seed: int = 0) -> dict:
    import bench.bakeoff as bk
    what, ov, lr, post = VARIANTS[name]
    spec = bk.RunSpec("mega", lr, None, seed)
    old_wd = bk.WEIGHT_DECAY
    if name == "wd-0":
        bk.WEIGHT_DECAY = 0.0
    try:
        rec = bk.train_run(spec, data, PROBE, PROBE["seq_len"], steps * PROBE["seq_len"] * PROBE["windows_per_step"],
                           {"mega": ov}, None, log=lambda s: print(f"[{name}]{s}", flush=True), post_build=post)
    finally:
        bk.WEIGHT_DECAY = old_wd
    rec["variant"], rec["what"] = name, what
    return rec


def write_table(out: str) -> None:
    recs = []
    for name in VARIANTS:
        path = os.path.join(out, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                recs.append(json.load(f))
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump(recs, f, indent=1)
    lines = ["| variant | what changes | held-out loss by training step | final | tok/s |", "|---|---|---|---|---|"]
    for r in recs:
        curve = " → ".join(f"{p['loss']:.2f}" for p in r["curve"])
        lines.append(f"| {r['variant']} | {r['what']} | {curve} (steps "
                     f"{', '.join(str(p['step']) for p in r['curve'])}) | **{r['curve'][-1]['loss']:.3f}** | "
                     f"{r['train_tokens_per_s']:.0f} |")
    if recs:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in recs:
            ax.plot([p["step"] for p in r["curve"]], [p["loss"] for p in r["curve"]], marker="o", label=r["variant"])
        ax.set_xlabel("training step (1024 tokens each)")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title("MEGA demo shape: one change against initializer_range 0.02")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "curves.png"), dpi=110)
        plt.close(fig)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("# Why a small MEGA at initializer_range 0.02 does not learn: controlled variants\n\n"
                "Made by `bench/bakeoff_init.py` (its docstring has the setup); held-out loss in nats/token.\n\n"
                + "\n".join(lines) + "\n\n![held-out loss by step](curves.png)\n")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        print(f"bakeoff_init: error: --only: unknown {bad}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    for name in names:
        path = os.path.join(a.out, f"{name}.json")
        if os.path.isfile(path):
            continue
        rec = run_variant(name, a.data, a.steps, a.seed)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(path + ".tmp", path)
        write_table(a.out)
    write_table(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
