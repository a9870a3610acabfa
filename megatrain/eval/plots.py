"""Plots of an evaluation (matplotlib, Agg: no display needed).

    from megatrain.eval.plots import plot_positions, plot_passkey
    plot_positions(results["by_position"], "out/loss_by_position.png")   # loss vs position, log x, a line per length
    plot_passkey(results["passkey"], "out/passkey.png")                   # accuracy heatmap, length x depth
"""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_positions(by_position: dict, path: str) -> str:
    """`by_position`: {seq_len: [{"lo", "hi", "tokens", "loss"}, ...]} -> a PNG at `path` (returned)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for seq_len, bins in sorted(by_position.items(), key=lambda kv: int(kv[0])):
        pts = [((b["lo"] * max(b["hi"] - 1, b["lo"])) ** 0.5, b["loss"]) for b in bins if b["loss"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"L = {seq_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (tokens of context; bin centre)")
    ax.set_ylabel("mean held-out loss (nats / token)")
    ax.set_title("held-out loss by position")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def passkey_panel(ax, rows: list, title: str = "passkey retrieval accuracy"):
    """Draw one passkey heatmap (length x depth, accuracy written in each cell) on the matplotlib axes `ax`; the
    image (for a colour bar). `rows`: [{"length", "depth", "accuracy", ...}]."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[next((r["accuracy"] for r in rows if r["length"] == L and r["depth"] == d), float("nan"))
             for L in lengths] for d in depths]
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title)
    return im


def plot_passkey(rows: list, path: str) -> str:
    """`rows`: [{"length", "depth", "accuracy", "trials"}] -> a heatmap PNG (length x depth) at `path`."""
    plt = _pyplot()
    n_len, n_depth = len({r["length"] for r in rows}), len({r["depth"] for r in rows})
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_len, 1.2 + 0.6 * n_depth))
    fig.colorbar(passkey_panel(ax, rows), ax=ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
