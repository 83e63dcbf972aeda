"""Mixture weights: the paper remixes sources by share of training tokens; grain mixes by share of documents.

A dataset whose documents are long contributes more tokens per document drawn, so a token share w_i becomes the
document proportion w_i / (mean targets per document of dataset i). No weights means every dataset in proportion
to its size, as if the datasets were concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsjax.errors import ConfigError


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """data.weights ("0.7,0.3") -> floats, one per dataset."""
    if text is None or not str(text).strip():
        return None
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"data.weights={text!r} is not a comma-separated list of numbers.") from None
    if len(weights) != count:
        raise ConfigError(f"data.weights has {len(weights)} values but data.datasets names {count} datasets.")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"data.weights={text!r} must all be positive (leave a dataset out rather than weight it 0).")
    return weights


def document_proportions(token_weights: Sequence[float] | None, split_stats: Sequence[dict]) -> list[float]:
    """Per-dataset shares of documents that give the requested shares of tokens (stats: a manifest split each)."""
    if token_weights is None:
        return [float(s["documents"]) for s in split_stats]
    mean_targets = [s["targets"] / s["documents"] for s in split_stats]
    raw = [w / m for w, m in zip(token_weights, mean_targets)]
    return [r / sum(raw) for r in raw]
