"""The paper's fits on sweep records: the near-optimal hyperparameter band, lr_opt(C) and B_opt(C), IsoFLOP minima,
and M_opt = k C^a, D_opt = k' C^b with bootstrap confidence intervals.

- Near-optimal (the paper's section 3.1): per budget, every (lr, batch) point whose bits-per-byte is within 0.25% of
  that budget's best; lr_opt(C) and B_opt(C) are power laws fitted by least squares in log space to all the band's
  points of all budgets, as the paper fits them.
- IsoFLOP minima: per budget, a parabola of bpb in log M (and, separately, in log D, with D the tokens actually
  trained), its vertex the budget's M_opt (D_opt). This is the Chinchilla-style IsoFLOP fit; the paper plots IsoFLOP
  curves and fits the optima the same way. The parabola is fitted to the best sampled point and up to `WINDOW`
  neighbours on each side, not to the whole curve: far from the minimum the curves are not symmetric in log M (on
  the CPU sweep, bpb jumps between one- and two-layer shapes), and a parabola through all points puts the vertex
  where no point is. A budget whose parabola opens downwards or whose vertex falls outside the M of its window has
  no interior minimum; it is left out of the law and named in the result.
- Confidence intervals: a residual bootstrap. Each replicate adds to every budget's fitted parabola its own residuals
  drawn with replacement (scaled by sqrt(n / (n - 3)) for the three fitted coefficients), refits the vertices and
  the power laws; the interval is the 2.5th..97.5th percentile of the replicates.
- D_opt is fitted on its own (not as C / M_opt), so a + b near 1 is a check, not an identity.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

NEAR_OPTIMAL = 0.0025  # within 0.25% of the best generalization error
WINDOW = 2  # IsoFLOP parabolas: the best point and this many neighbours on each side


def by_budget(records: list[dict]) -> dict[float, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[float(r["C"])].append(r)
    return dict(sorted(groups.items()))


def near_optimal(records: list[dict], tol: float = NEAR_OPTIMAL) -> dict[float, list[dict]]:
    """Per budget, the records whose bpb is at most (1 + tol) x that budget's best."""
    out = {}
    for C, group in by_budget(records).items():
        best = min(r["bpb"] for r in group)
        out[C] = [r for r in group if r["bpb"] <= best * (1 + tol)]
    return out


def power_law(x, y) -> tuple[float, float]:
    """(k, a) of y = k x^a by least squares on log y against log x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(np.log(x)) == 0:
        raise ValueError("a power law needs points at two or more distinct x.")
    a, log_k = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(log_k)), float(a)


def fit_hparams(records: list[dict], tol: float = NEAR_OPTIMAL) -> dict:
    """lr_opt(C) = k C^a and B_opt(C) = k C^a (B in tokens) on the near-optimal band of a (lr, batch) sweep."""
    band = near_optimal(records, tol)
    points = [r for group in band.values() for r in group]
    if len(band) < 2:
        raise ValueError(f"fitting lr_opt(C) and B_opt(C) needs sweeps at two or more budgets, got {len(band)}.")
    C = [r["C"] for r in points]
    lr_k, lr_a = power_law(C, [r["lr"] for r in points])
    b_k, b_a = power_law(C, [r["batch"] * r["seq_len"] for r in points])
    return {"lr": {"k": lr_k, "a": lr_a}, "batch_tokens": {"k": b_k, "a": b_a}, "tolerance": tol,
            "band": {f"{C:.4g}": [{"lr": r["lr"], "batch": r["batch"], "bpb": r["bpb"]} for r in group]
                     for C, group in band.items()},
            "best": {f"{C:.4g}": min(({"lr": r["lr"], "batch": r["batch"], "bpb": r["bpb"]} for r in group),
                                     key=lambda r: r["bpb"]) for C, group in by_budget(records).items()}}


def parabola_vertex(log_x, y) -> tuple[float, float, float] | None:
    """(log x at the vertex, y at the vertex, curvature) of y = c2 log_x^2 + c1 log_x + c0; None if it opens
    downwards."""
    c2, c1, c0 = np.polyfit(log_x, y, 2)
    if c2 <= 0:
        return None
    return float(-c1 / (2 * c2)), float(c0 - c1 * c1 / (4 * c2)), float(c2)


def window(records: list[dict], key: str = "M", width: int = WINDOW) -> list[dict]:
    """One budget's records sorted by `key`, cut to the best one and `width` neighbours on each side."""
    ordered = sorted(records, key=lambda r: r[key])
    best = min(range(len(ordered)), key=lambda i: ordered[i]["bpb"])
    return ordered[max(0, best - width):best + width + 1]


def _windows(groups, key: str, width: int) -> dict:
    return {C: window(group, key, width) for C, group in groups.items()}


def _minima(windows, key: str, values=None):
    """Per budget, the parabola's vertex in log(record[key]) or None; `values` replaces the bpb (bootstrap)."""
    out = {}
    for C, group in windows.items():
        log_x = np.log([r[key] for r in group])
        y = np.array([r["bpb"] for r in group]) if values is None else values[C]
        vertex = parabola_vertex(log_x, y) if len(group) >= 3 else None
        inside = vertex is not None and log_x.min() <= vertex[0] <= log_x.max()
        out[C] = (math.exp(vertex[0]), *vertex[1:]) if inside else None
    return out


def isoflop_minima(records: list[dict], width: int = WINDOW) -> dict:
    """Per budget: M_opt and D_opt (None where the sampled points have no interior minimum) and the best bpb."""
    groups = by_budget(records)
    m, d = _minima(_windows(groups, "M", width), "M"), _minima(_windows(groups, "D", width), "D")
    return {C: {"M_opt": m[C][0] if m[C] else None, "D_opt": d[C][0] if d[C] else None,
                "bpb_at_M_opt": m[C][1] if m[C] else None, "points": len(groups[C]),
                "best_sampled": min(groups[C], key=lambda r: r["bpb"])["M"]} for C in groups}


def _law(minima: dict) -> tuple[float, float] | None:
    pairs = [(C, v[0]) for C, v in minima.items() if v is not None]
    return power_law(*zip(*pairs)) if len({C for C, _ in pairs}) >= 2 else None


def fit_allocation(records: list[dict], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                   width: int = WINDOW) -> dict:
    """M_opt = k C^a and D_opt = k' C^b from the IsoFLOP minima, with bootstrap intervals."""
    groups = by_budget(records)
    windows = {"M": _windows(groups, "M", width), "D": _windows(groups, "D", width)}
    minima = {name: _minima(windows[name], name) for name in ("M", "D")}
    laws = {name: _law(found) for name, found in minima.items()}
    for name, law in laws.items():
        if law is None:
            raise ValueError(f"fitting {name}_opt(C) needs an interior IsoFLOP minimum at two or more budgets; "
                             f"found one at {[f'{C:.3g}' for C, v in minima[name].items() if v]}.")
    rng = np.random.default_rng(seed)
    # Fitted parabola values and scaled residuals per budget, for each of log M and log D.
    fitted, residuals = {}, {}
    for name, key in (("M", "M"), ("D", "D")):
        fitted[name], residuals[name] = {}, {}
        for C, group in windows[name].items():
            log_x = np.log([r[key] for r in group])
            y = np.array([r["bpb"] for r in group])
            if len(group) < 3:
                continue
            coef = np.polyfit(log_x, y, 2)
            fitted[name][C] = np.polyval(coef, log_x)
            n = len(group)
            scale = math.sqrt(n / (n - 3)) if n > 3 else 1.0
            residuals[name][C] = (y - fitted[name][C]) * scale
    replicates = {"M": [], "D": []}
    for _ in range(n_boot):
        for name, key in (("M", "M"), ("D", "D")):
            values = {C: fitted[name][C] + rng.choice(residuals[name][C], size=len(residuals[name][C]))
                      for C in fitted[name]}
            sub = {C: windows[name][C] for C in fitted[name]}
            law = _law(_minima(sub, key, values))
            if law is not None:
                replicates[name].append(law)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {"level": level, "n_boot": n_boot, "window": width,
           "method": f"IsoFLOP parabola in log M (log D) per budget, over the best point and {width} neighbours on "
                     "each side; power law by least squares in log space; residual bootstrap"}
    for name in ("M", "D"):
        k, a = laws[name]
        reps = np.array(replicates[name]) if replicates[name] else np.empty((0, 2))
        out[f"{name}_opt"] = {
            "k": k, "exponent": a,
            "k_interval": [float(np.percentile(reps[:, 0], lo)), float(np.percentile(reps[:, 0], hi))]
            if len(reps) else None,
            "exponent_interval": [float(np.percentile(reps[:, 1], lo)), float(np.percentile(reps[:, 1], hi))]
            if len(reps) else None,
            "replicates": len(reps),
            "budgets_used": [C for C, v in minima[name].items() if v is not None],
            "budgets_without_minimum": [C for C, v in minima[name].items() if v is None],
        }
    a, b = out["M_opt"]["exponent"], out["D_opt"]["exponent"]
    out["a_plus_b"] = a + b
    out["minima"] = {f"{C:.4g}": v for C, v in isoflop_minima(records, width).items()}
    return out
