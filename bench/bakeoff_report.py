"""The bake-off's README.md and plots from its results.json (bench/bakeoff.py calls write_report at the end).

    python bench/bakeoff_report.py bench/results/bakeoff-demo-<date>/     # redraw from results.json
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pm(ms: dict, fmt: str = ".3f") -> str:
    if ms is None or ms.get("mean") is None:
        return "–"
    return f"{ms['mean']:{fmt}} ± {ms['std']:{fmt}}" if ms["n"] > 1 else f"{ms['mean']:{fmt}}"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(results: dict, path: str) -> str:
    """Held-out loss (at the training length) against training tokens: one colour per arch, one line per seed of
    its best setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (arch, row) in enumerate(results["best"].items()):
        runs = [r for r in results["runs"] if (r["spec"]["arch"], r["spec"]["lr"], r["spec"]["init_range"])
                == (arch, row["lr"], row["init_range"])]
        for j, r in enumerate(sorted(runs, key=lambda r: r["spec"]["seed"])):
            ax.plot([p["tokens"] for p in r["curve"]], [p["loss"] for p in r["curve"]], color=f"C{i}",
                    alpha=0.9 if j == 0 else 0.5, label=f"{arch} (lr {row['lr']:g}"
                    + (f", init {row['init_range']:g}" if row["init_range"] is not None else "") + ")"
                    if j == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(f"held-out loss at {results['fixed']['seq_len']} tokens (one line per seed)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_positions(results: dict, path: str) -> str:
    """Loss by position (log bins, seed mean), one line per arch, at 1x and at the longest evaluation length."""
    plt = _pyplot()
    L = results["fixed"]["seq_len"]
    lengths = sorted({int(k) for row in results["best"].values() for k in row.get("by_position", {})})
    show = [x for x in (L, lengths[-1] if lengths else None) if x is not None]
    show = sorted(set(show))
    fig, axes = plt.subplots(1, len(show), figsize=(5.2 * len(show), 4.0), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], show):
        for i, (arch, row) in enumerate(results["best"].items()):
            bins = row.get("by_position", {}).get(str(n))
            if not bins:
                continue
            pts = [((b["lo"] * max(b["hi"] - 1, b["lo"])) ** 0.5, b["loss"]) for b in bins if b["loss"] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=arch)
        ax.axvline(L, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the document (bin centre)")
        ax.set_title(f"evaluated at {n} tokens ({n // L}x training length)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("held-out loss (nats / token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passkey(results: dict, path: str) -> str | None:
    """Passkey accuracy heatmaps (length x depth), one panel per arch, seed mean."""
    rows = {arch: row["passkey"] for arch, row in results["best"].items() if row.get("passkey")}
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows) + 1, 3.4), squeeze=False, layout="constrained")
    from megatrain.eval.plots import passkey_panel
    im = None
    for ax, (arch, cells) in zip(axes[0], rows.items()):
        im = passkey_panel(ax, cells, title=arch)
    fig.colorbar(im, ax=list(axes[0]))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    f = results["fixed"]
    L = f["seq_len"]
    lens = [str(L * k) for k in (1, 2, 4)]
    out = [f"# Bake-off: {', '.join(results['archs'])} — preset {f['preset']}", "",
           f"Data: {f['data']['train_tokens']:,} training tokens in {f['data']['train_docs']} documents, held out "
           f"{f['data']['heldout_tokens']:,} tokens in {f['data']['heldout_docs']} documents (vocabulary "
           f"{f['data']['vocab_size']}). Training length {L}, {f['windows_per_step']} windows per step, "
           f"{f['tokens']:,} tokens per run; LR grid {f['lrs']}, MEGA initializer_range grid {f['init_ranges']}; "
           f"best setting per arch at {results['seeds']} seed(s) (mean ± std over seeds). "
           f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} cores, "
           f"{results['machine']['threads']} torch thread(s), torch {results['machine']['torch']}.", "",
           "## Best setting per arch (held-out, megatrain's evaluation, same windows for every arch)", "",
           "| arch | params (non-emb.) | train FLOPs/token | lr | init | "
           + " | ".join(f"loss @{n}" for n in lens) + f" | bpb @{L} | ppl @{L} | 4x vs 1x | passkey | train tok/s |",
           "|---|---|---|---|---|" + "---|" * len(lens) + "---|---|---|---|---|"]
    for arch, row in results["best"].items():
        bl = row["by_length"]
        pk = row.get("passkey")
        pk_s = f"{sum(c['accuracy'] for c in pk) / len(pk):.2f}" if pk else "–"
        ratio = f"{row['loss_4x_over_1x']:+.1%}" if row.get("loss_4x_over_1x") is not None else "–"
        out.append(f"| {arch} | {row['params'] / 1e6:.2f}M ({row['non_embedding_params'] / 1e6:.2f}M) | "
                   f"{row['flops_per_token'] / 1e6:.1f}M | {row['lr']:g} | "
                   f"{'–' if row['init_range'] is None else format(row['init_range'], 'g')} | "
                   + " | ".join(_pm(bl[n]["loss"]) for n in lens)
                   + f" | {_pm(bl[lens[0]]['bpb'], '.4f')} | {_pm(bl[lens[0]]['ppl'], '.1f')} | {ratio} | {pk_s} | "
                   f"{_pm(row['train_tokens_per_s'], '.0f')} |")
    out += ["", "## The sweep (seed 0; held-out loss at the end of training, on the curve's windows)", "",
            "| arch | lr | init | final held-out loss | train tok/s |", "|---|---|---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (r["spec"]["arch"], r["spec"]["lr"], r["spec"]["init_range"] or 0)):
        if r["spec"]["seed"] != 0:
            continue
        s = r["spec"]
        out.append(f"| {s['arch']} | {s['lr']:g} | {'–' if s['init_range'] is None else format(s['init_range'], 'g')}"
                   f" | {r['curve'][-1]['loss']:.4f} | {r['train_tokens_per_s']:.0f} |")
    digests = sorted({(r["spec"]["seed"], r["stream_sha256"][:16]) for r in results["runs"]})
    out += ["", "Same tokens: every run of one seed read one token stream (sha256 of every step's input_ids, labels "
            "and doc_ids): " + ", ".join(f"seed {s} `{d}`" for s, d in digests) + ".", "",
            "![held-out loss against training tokens](loss_curve.png)", "",
            "![loss by position at 1x and 4x the training length](loss_by_position.png)", ""]
    if any(row.get("passkey") for row in results["best"].values()):
        out += ["![passkey retrieval accuracy](passkey.png)", ""]
    sp = results.get("speed")
    if sp:
        out += [f"Training speed measured apart (`--speed {sp['steps']}`: every arch in one process, interleaved step "
                f"by step on the same windows, {sp['threads']} thread(s), load average "
                f"{', '.join(f'{x:.1f}' for x in sp['load_average'])} at the end):", "",
                "| arch | tok/s (wall) | tok/CPU-s |", "|---|---|---|"]
        out += [f"| {arch} | {v['tokens_per_s']:.0f} | {v['tokens_per_cpu_s']:.0f} |" for arch, v in sp["archs"].items()]
        out += [""]
    out += ["Reproduce: `" + (results.get("command") or "python bench/bakeoff.py ...") + "`", ""]
    return "\n".join(out)


def write_report(results: dict, out: str) -> None:
    plot_curves(results, os.path.join(out, "loss_curve.png"))
    plot_positions(results, os.path.join(out, "loss_by_position.png"))
    plot_passkey(results, os.path.join(out, "passkey.png"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(markdown(results))


if __name__ == "__main__":
    folder = sys.argv[1]
    with open(os.path.join(folder, "results.json")) as fh:
        write_report(json.load(fh), folder)
