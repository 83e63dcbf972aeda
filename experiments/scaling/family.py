"""The model family and the points of a sweep: shapes from a target model scale M, steps from a budget C.

Model scale is the paper's M (non-embedding FLOPs per token, `dsjax.scaling.M`), so a shape is picked by M, not by
parameters: for a target M the family takes the depth whose width, solved from M = 72 L d^2 + 12 L d l, lies
closest to `aspect` x depth (d_model / n_layer; tiny's is 32), width a multiple of `head_dim`. Heads are plain
multi-head (n_kv_heads = n_heads) and d_ff = 8/3 d_model rounded to 8, the block the M formula is exact for.
A point's tokens are D = C / M, trained as whole steps of batch x seq_len tokens.
"""

from __future__ import annotations

import dataclasses
import math

from dsjax import scaling


@dataclasses.dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def d_ff(self) -> int:
        return 8 * round(self.d_model * 8 / 3 / 8)

    @property
    def name(self) -> str:
        return f"L{self.n_layers}d{self.d_model}"

    def M(self, seq_len: int) -> float:
        return scaling.M(self.n_layers, self.d_model, seq_len)

    def model_overrides(self, vocab_size: int, seq_len: int) -> dict:
        return dict(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, d_ff=self.d_ff, max_seq_len=seq_len)


def _width_for(M: float, n_layers: int, seq_len: int) -> float:
    """d solving 72 L d^2 + 12 L d l = M (the positive root)."""
    a, b = 72 * n_layers, 12 * n_layers * seq_len
    return (-b + math.sqrt(b * b + 4 * a * M)) / (2 * a)


def shape_for(M: float, seq_len: int, *, aspect: float = 32.0, head_dim: int = 32, max_layers: int = 64) -> Shape:
    """The family's shape whose M is nearest the target (in log), depth chosen by the aspect ratio."""
    scaling._check_positive("M", M)
    best = None
    for n_layers in range(1, max_layers + 1):
        width = _width_for(M, n_layers, seq_len)
        d_model = max(head_dim, head_dim * round(width / head_dim))
        shape = Shape(n_layers, d_model, head_dim)
        # Depth by aspect ratio first, then the rounded width's M closest to the target.
        key = (abs(math.log(d_model / n_layers / aspect)), abs(math.log(shape.M(seq_len) / M)))
        if best is None or key < best[0]:
            best = (key, shape)
    return best[1]


def shapes_around(M_center: float, seq_len: int, *, points: int, span: float, **family) -> list[Shape]:
    """Up to `points` distinct shapes, M spread geometrically over M_center / sqrt(span) .. M_center * sqrt(span).

    Fewer when neighbouring targets round to the same shape (the family has no model below L1d{head_dim}).
    """
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}.")
    lo = math.log(M_center) - math.log(span) / 2
    step = math.log(span) / (points - 1) if points > 1 else 0.0
    out = []
    for i in range(points):
        shape = shape_for(math.exp(lo + i * step), seq_len, **family)
        if shape not in out:
            out.append(shape)
    return sorted(out, key=lambda s: s.M(seq_len))


@dataclasses.dataclass(frozen=True)
class Point:
    """One training run of a sweep: model shape, budget, hyperparameters and the steps that spend the budget."""

    C: float
    shape: Shape
    seq_len: int
    lr: float
    batch: int  # sequences per step
    vocab_size: int

    @property
    def M(self) -> float:
        return self.shape.M(self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    @property
    def steps(self) -> int:
        """Whole steps of batch x seq_len nearest D = C / M (at least one)."""
        return max(1, round(self.C / self.M / self.tokens_per_step))

    @property
    def D(self) -> int:
        """Tokens actually trained: steps x batch x seq_len (C / M to within one step)."""
        return self.steps * self.tokens_per_step

    @property
    def key(self) -> str:
        """Names the point in the results file and its run directory; equal keys are the same run."""
        return f"C{self.C:.3g}_{self.shape.name}_s{self.seq_len}_lr{self.lr:.4g}_b{self.batch}"

    def record(self) -> dict:
        s = self.shape
        return {"key": self.key, "C": self.C, "M": self.M, "N1": scaling.N1(s.n_layers, s.d_model),
                "N2": scaling.N2(s.n_layers, s.d_model, self.vocab_size), "D": self.D, "steps": self.steps,
                "lr": self.lr, "batch": self.batch, "seq_len": self.seq_len, "n_layers": s.n_layers,
                "d_model": s.d_model, "n_heads": s.n_heads, "d_ff": s.d_ff}
