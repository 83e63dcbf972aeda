"""The sweep's figures as PNG, drawn from the records and the fits only (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsjax import scaling
from experiments.scaling.fit import WINDOW, by_budget, near_optimal, window


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def isoflop(records: list[dict], allocation: dict | None, path: Path) -> Path:
    """bpb against M per budget; the parabola fitted around each budget's best point, its minimum marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = by_budget(records)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(groups))))
    for color, (C, group) in zip(colors, groups.items()):
        group = sorted(group, key=lambda r: r["M"])
        M = np.array([r["M"] for r in group])
        bpb = np.array([r["bpb"] for r in group])
        ax.plot(M, bpb, "o", color=color, label=f"C = {C:.2g}")
        near = window(group, "M", (allocation or {}).get("window", WINDOW))
        if len(near) >= 3:
            M_near = np.array([r["M"] for r in near])
            coef = np.polyfit(np.log(M_near), [r["bpb"] for r in near], 2)
            xs = np.geomspace(M_near.min(), M_near.max(), 100)
            ax.plot(xs, np.polyval(coef, np.log(xs)), "-", color=color, alpha=0.7)
        found = (allocation or {}).get("minima", {}).get(f"{C:.4g}", {})
        if found.get("M_opt"):
            ax.plot(found["M_opt"], found["bpb_at_M_opt"], "*", color=color, markersize=14, markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("M (non-embedding FLOPs / token)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("IsoFLOP curves (line: the parabola around the best point; star: its minimum)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def allocation(allocation: dict, path: Path) -> Path:
    """M_opt and D_opt against C: the IsoFLOP minima, our fits with their intervals, and the paper's laws."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    minima = {float(C): v for C, v in allocation["minima"].items()}
    budgets = np.array(sorted(minima))
    xs = np.geomspace(budgets.min() / 1.5, budgets.max() * 1.5, 50)
    for ax, name, paper in ((axes[0], "M", scaling.M_FIT), (axes[1], "D", scaling.D_FIT)):
        fit = allocation[f"{name}_opt"]
        found = [(C, v[f"{name}_opt"]) for C, v in minima.items() if v[f"{name}_opt"]]
        if found:
            ax.plot(*zip(*found), "o", color="C0", label="IsoFLOP minima")
        a_lo, a_hi = fit["exponent_interval"] or (fit["exponent"], fit["exponent"])
        ax.plot(xs, fit["k"] * xs ** fit["exponent"], "-", color="C0",
                label=f"fit: {fit['k']:.3g} C^{fit['exponent']:.3f} [{a_lo:.3f}, {a_hi:.3f}]")
        ax.plot(xs, paper[0] * xs ** paper[1], "--", color="C3", label=f"paper: {paper[0]} C^{paper[1]}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (FLOPs)")
        ax.set_ylabel(f"{name}_opt" + (" (FLOPs / token)" if name == "M" else " (tokens)"))
        ax.legend(fontsize=8)
    fig.suptitle(f"Optimal allocation; a + b = {allocation['a_plus_b']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def hparams(records: list[dict], fits: dict | None, path: Path) -> Path:
    """Per budget, the (batch, lr) grid coloured by bpb with the near-optimal band circled; then both fitted laws."""
    plt = _pyplot()
    groups = by_budget(records)
    band = near_optimal(records, fits["tolerance"] if fits else 0.0025)
    fig, axes = plt.subplots(1, len(groups) + 2, figsize=(4 * (len(groups) + 2), 3.8), squeeze=False)
    for ax, (C, group) in zip(axes[0], groups.items()):
        tokens = [r["batch"] * r["seq_len"] for r in group]
        points = ax.scatter(tokens, [r["lr"] for r in group], c=[r["bpb"] for r in group], cmap="viridis_r", s=60)
        ax.scatter([r["batch"] * r["seq_len"] for r in band[C]], [r["lr"] for r in band[C]], s=160,
                   facecolors="none", edgecolors="r", label="within 0.25% of best")
        fig.colorbar(points, ax=ax, label="bpb")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel("peak lr")
        ax.set_title(f"C = {C:.2g}")
        ax.legend(fontsize=7)
    budgets = np.array(sorted(groups))
    xs = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50)
    laws = (("lr", "near-optimal peak lr", lambda r: r["lr"], scaling.LR_FIT),
            ("batch_tokens", "near-optimal batch (tokens)", lambda r: r["batch"] * r["seq_len"], scaling.BATCH_FIT))
    for ax, (name, label, value, paper) in zip(axes[0][-2:], laws):
        for C, group in band.items():
            ax.plot([C] * len(group), [value(r) for r in group], "o", color="C0")
        if fits:
            k, a = fits[name]["k"], fits[name]["a"]
            ax.plot(xs, k * xs**a, "-", color="C0", label=f"fit {k:.3g} C^{a:.3f}")
        ax.plot(xs, paper[0] * xs ** paper[1], "--", color="C3", label=f"paper {paper[0]} C^{paper[1]}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
