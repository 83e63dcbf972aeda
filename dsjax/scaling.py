"""DeepSeek LLM scaling laws (arXiv 2401.02954, section 3): model scale, compute, and the fitted optima.

The paper measures model scale as non-embedding FLOPs per token, M, rather than a parameter count, because
N1 (non-embedding params) and N2 (all params) mis-state compute for small models, where attention over the sequence
(the `12 * n_layer * d_model * l_seq` term) is a large share. Compute is then C = M * D (D = training tokens), and the
paper fits, on budgets 1e17..3e20 FLOPs:

    lr_opt = 0.3118 * C^-0.1250         B_opt = 0.2920 * C^0.3271   (B in tokens)
    M_opt  = 0.1715 * C^0.5243          D_opt = 5.8316 * C^0.4757

Function names follow the paper's symbols (M, N1, N2, M_opt, ...). The M formula uses only n_layer, d_model and l_seq:
it assumes a standard block (d_ff ~ 8/3 d_model with SwiGLU, plain multi-head attention). The 67B's grouped-query
attention (8 kv heads for 64 query heads) and d_ff = 2.69 d_model make M an approximation for it, exactly as the paper
itself applies it. Exact parameter counts come from the model's abstract shapes instead (`model_report`).

CLI:  python -m dsjax.scaling --config=7b --tokens=2e12 [--json]
      python -m dsjax.scaling --compute=1e20 [--seq_len=4096] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import re
import sys

from dsjax.errors import ConfigError

# The paper's fitted coefficients (coefficient, exponent), in FLOPs.
LR_FIT = (0.3118, -0.1250)
BATCH_FIT = (0.2920, 0.3271)
M_FIT = (0.1715, 0.5243)
D_FIT = (5.8316, 0.4757)

DEFAULT_SEQ_LEN = 4096
MODEL_REPORT_KEYS = (
    "params", "N1", "N2", "M", "C", "lr_opt", "batch_tokens_opt", "batch_seqs_opt", "M_opt", "D_opt",
)
BUDGET_REPORT_KEYS = ("C", "M_opt", "D_opt", "lr_opt", "batch_tokens_opt", "batch_seqs_opt")


def _check_positive(name: str, value) -> float:
    """User-supplied sizes must be finite and > 0; the power laws are meaningless otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Model scale and compute.


def M(n_layer: int, d_model: int, l_seq: int) -> float:
    """Non-embedding FLOPs per token: 72*n_layer*d_model^2 + 12*n_layer*d_model*l_seq (the paper's model scale).

    Counts forward + backward (3x forward) of the dense matmuls and the attention over l_seq, excluding the vocabulary
    projection. Exact for d_ff = 8/3 d_model with plain MHA; an approximation otherwise (see the module docstring).
    """
    for name, value in (("n_layer", n_layer), ("d_model", d_model), ("l_seq", l_seq)):
        _check_positive(name, value)
    return 72 * n_layer * d_model**2 + 12 * n_layer * d_model * l_seq


def N1(n_layer: int, d_model: int) -> float:
    """Non-embedding parameters, as a parameter count: 6*N1 = 72*n_layer*d_model^2, so N1 = 12*n_layer*d_model^2.

    Returned divided by 6 (a count, not FLOPs) so it compares directly to the model's real parameter count.
    """
    _check_positive("n_layer", n_layer)
    _check_positive("d_model", d_model)
    return 72 * n_layer * d_model**2 / 6


def N2(n_layer: int, d_model: int, n_vocab: int) -> float:
    """Parameters including the (input) embedding: 6*N2 = 72*n_layer*d_model^2 + 6*n_vocab*d_model, returned / 6.

    The paper's N2 counts one n_vocab x d_model matrix; dsjax's untied output head adds another to the exact count.
    """
    _check_positive("n_vocab", n_vocab)
    return N1(n_layer, d_model) + n_vocab * d_model


def compute(M: float, D: float) -> float:
    """Training compute in FLOPs: C = M * D (FLOPs per token times tokens)."""
    return _check_positive("M", M) * _check_positive("D", D)


# ---------------------------------------------------------------------------------------------------------------------
# Fitted optima, all functions of the compute budget C (FLOPs).


def _power_law(fit: tuple[float, float], C: float) -> float:
    coefficient, exponent = fit
    return coefficient * _check_positive("C", C) ** exponent


def lr_opt(C: float) -> float:
    """Near-optimal peak learning rate for budget C: 0.3118 * C^-0.1250."""
    return _power_law(LR_FIT, C)


def batch_tokens_opt(C: float) -> float:
    """Near-optimal global batch in tokens for budget C: B_opt = 0.2920 * C^0.3271."""
    return _power_law(BATCH_FIT, C)


def M_opt(C: float) -> float:
    """Compute-optimal model scale (non-embedding FLOPs/token) for budget C: 0.1715 * C^0.5243."""
    return _power_law(M_FIT, C)


def D_opt(C: float) -> float:
    """Compute-optimal number of training tokens for budget C: 5.8316 * C^0.4757 (M_opt * D_opt ~ C)."""
    return _power_law(D_FIT, C)


def batch_seqs(batch_tokens: float, seq_len: int) -> int:
    """A token batch as whole sequences of seq_len (rounded, at least one): what the trainer actually uses."""
    return max(1, round(batch_tokens / _check_positive("seq_len", seq_len)))


# ---------------------------------------------------------------------------------------------------------------------
# Reports.


def model_report(model_cfg, seq_len: int, tokens: float) -> dict:
    """Scale, compute and the scaling-law optima for one model trained on `tokens` tokens of `seq_len`.

    `params` is exact (from the abstract model's shapes, nothing allocated); N1/N2/M are the paper's approximations.
    Keys: MODEL_REPORT_KEYS.
    """
    from dsjax.model import abstract_model, param_count  # jax model import only where an exact count is needed

    _check_positive("seq_len", seq_len)
    _check_positive("tokens", tokens)
    m = M(model_cfg.n_layers, model_cfg.d_model, seq_len)
    C = compute(m, tokens)
    return {
        "params": param_count(abstract_model(model_cfg)),
        "N1": N1(model_cfg.n_layers, model_cfg.d_model),
        "N2": N2(model_cfg.n_layers, model_cfg.d_model, model_cfg.vocab_size),
        "M": m,
        "C": C,
        "lr_opt": lr_opt(C),
        "batch_tokens_opt": batch_tokens_opt(C),
        "batch_seqs_opt": batch_seqs(batch_tokens_opt(C), seq_len),
        "M_opt": M_opt(C),
        "D_opt": D_opt(C),
    }


def budget_report(C: float, seq_len: int = DEFAULT_SEQ_LEN) -> dict:
    """How the paper would spend a compute budget C: model scale, tokens, lr and batch. Keys: BUDGET_REPORT_KEYS."""
    _check_positive("C", C)
    return {
        "C": C,
        "M_opt": M_opt(C),
        "D_opt": D_opt(C),
        "lr_opt": lr_opt(C),
        "batch_tokens_opt": batch_tokens_opt(C),
        "batch_seqs_opt": batch_seqs(batch_tokens_opt(C), seq_len),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Filling in a run config's unset lr / batch.


@dataclasses.dataclass(frozen=True)
class ScalingChoice:
    """The lr and global batch (sequences) a run should use, the D and C they imply, and why (one line)."""

    lr: float
    global_batch_size: int
    tokens: float
    compute: float
    explanation: str


def tokens_for_steps(steps: int, m: float, tol: float = 1e-12, max_iter: int = 200) -> tuple[float, int]:
    """Solves D = steps * B_opt(M * D) for D by fixed-point iteration; returns (D, iterations).

    Needed when the batch is unset: the batch comes from C, but C = M * D and D = steps * batch. In log space the map
    is log D <- log(steps * 0.2920 * M^0.3271) + 0.3271 * log D, a contraction with factor 0.3271 < 1, so it converges
    from any start (error shrinks ~3x per step; ~25 steps to 1e-12). The fixed point is
    D* = (steps * 0.2920 * M^0.3271)^(1 / (1 - 0.3271)), which the tests check against.
    """
    _check_positive("train.steps", steps)
    _check_positive("M", m)
    D = steps * float(DEFAULT_SEQ_LEN)  # any positive start works; one sequence per step is a sane one
    for iteration in range(1, max_iter + 1):
        new_D = steps * batch_tokens_opt(compute(m, D))
        if abs(new_D - D) <= tol * new_D:
            return new_D, iteration
        D = new_D
    raise RuntimeError(f"D = steps * B_opt(M*D) did not converge in {max_iter} iterations (last D = {D:.6g}).")


def _short(x: float, digits: int = 3) -> str:
    """4.246e-04 -> '4.25e-4': compact scientific notation for explanations."""
    text = f"{x:.{digits - 1}e}"
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", text)


def choose_hyperparams(cfg) -> ScalingChoice:
    """Chooses cfg.optim.lr and/or cfg.train.global_batch_size from the scaling laws where they are None.

    D = train.steps * batch tokens. With the batch set, D is known and C = M * D directly. With the batch unset,
    D = steps * B_opt(C) depends on itself through C, so it is solved by `tokens_for_steps`; the batch is then rounded
    to whole sequences and the lr uses C from the tokens actually trained on (steps * rounded batch * seq_len).
    M uses cfg.train.seq_len as l_seq. Values already set are kept. Does not modify cfg; rounding the batch to a
    multiple of the data-parallel devices is left to the caller.
    """
    from dsjax.config import model_config

    model_cfg = model_config(cfg)
    steps, seq_len = cfg.train.steps, cfg.train.seq_len
    _check_positive("train.steps", steps)
    _check_positive("train.seq_len", seq_len)
    lr, batch = cfg.optim.lr, cfg.train.global_batch_size
    m = M(model_cfg.n_layers, model_cfg.d_model, seq_len)

    batch_note = None
    if batch is None:
        D_solved, iterations = tokens_for_steps(steps, m)
        batch = batch_seqs(D_solved / steps, seq_len)
        batch_note = (
            f"batch {batch} seqs of {seq_len} from B_opt = 0.2920*C^0.3271 = {_short(D_solved / steps)} tokens, "
            f"D = steps*B_opt solved by fixed point ({iterations} iterations)"
        )
    else:
        _check_positive("train.global_batch_size", batch)
    D = float(steps) * batch * seq_len
    C = compute(m, D)
    c_note = (
        f"C = M*D = {_short(m)}*{_short(D)} = {_short(C)} FLOPs (D = {steps} steps * {batch} seqs * {seq_len} tokens)"
    )
    if lr is None:
        lr = lr_opt(C)
        explanation = f"lr {_short(lr, 2)} from lr_opt = 0.3118*C^-0.125 with {c_note}"
        if batch_note:
            explanation += f"; {batch_note}"
    elif batch_note:
        explanation = f"{batch_note}; lr {_short(lr, 2)} as configured; {c_note}"
    else:
        explanation = f"lr {_short(lr, 2)} and batch {batch} seqs as configured (no scaling law used)"
    return ScalingChoice(lr=float(lr), global_batch_size=int(batch), tokens=D, compute=C, explanation=explanation)


# ---------------------------------------------------------------------------------------------------------------------
# CLI.


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump or traceback
        self.exit(2, f"dsjax.scaling: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dsjax.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="named config (tiny, 7b, 67b) or a config .py file")
    parser.add_argument("--tokens", type=float, help="training tokens D (default: the config's steps*batch*seq_len)")
    parser.add_argument("--compute", type=float, help="compute budget C in FLOPs (alone, without --config)")
    parser.add_argument("--seq_len", type=int, help="sequence length l_seq (default: the config's, or 4096)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _run(args) -> tuple[str, dict]:
    """Validates the flags (ConfigError naming the flag) and builds the report; returns (title, report)."""
    for flag in ("tokens", "compute", "seq_len"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{flag} must be a positive finite number, got {value!r}.")
    if args.compute is not None:
        if args.config is not None or args.tokens is not None:
            raise ConfigError("--compute gives a budget alone; drop --config/--tokens (or drop --compute).")
        seq_len = args.seq_len or DEFAULT_SEQ_LEN
        return f"compute budget C = {args.compute:.4g} FLOPs, seq_len {seq_len}", budget_report(args.compute, seq_len)
    if args.config is None:
        raise ConfigError("pass --config (with --tokens) for a model, or --compute for a budget alone.")

    from dsjax.config import load_config, model_config

    cfg = load_config(args.config)
    seq_len = args.seq_len or cfg.train.seq_len
    tokens = args.tokens
    if tokens is None:
        if cfg.train.global_batch_size is None:
            raise ConfigError(f"--tokens is required: config {args.config!r} has no train.global_batch_size.")
        tokens = float(cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_len)
    title = f"config {cfg.name}, seq_len {seq_len}, D = {tokens:.4g} tokens"
    return title, model_report(model_config(cfg), seq_len, tokens)


_DESCRIPTIONS = {
    "params": "exact parameter count",
    "N1": "non-embedding params (12*n_layer*d_model^2)",
    "N2": "N1 + n_vocab*d_model",
    "M": "non-embedding FLOPs/token",
    "C": "compute M*D (FLOPs)",
    "lr_opt": "0.3118*C^-0.1250",
    "batch_tokens_opt": "0.2920*C^0.3271 (tokens)",
    "batch_seqs_opt": "batch_tokens_opt / seq_len",
    "M_opt": "0.1715*C^0.5243 (FLOPs/token)",
    "D_opt": "5.8316*C^0.4757 (tokens)",
}


def _table(title: str, report: dict) -> str:
    lines = [title]
    for key, value in report.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
        lines.append(f"  {key:<17}{shown:>16}   {_DESCRIPTIONS[key]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        title, report = _run(args)
    except ConfigError as error:
        print(f"dsjax.scaling: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _table(title, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
