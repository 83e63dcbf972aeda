"""Losses. A loss takes (model, batch) and returns (sum of weighted per-token losses, sum of weights).

Returning sums, not means, lets gradient accumulation and data parallelism combine micro-batches exactly: the step
divides by the global weight total once. Pretraining and SFT use `next_token_loss` (SFT zeroes the prompt's
`loss_weights`); DPO brings its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token -log p(target), computed in float32 from logits of any dtype."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def next_token_loss(model, batch) -> tuple[jax.Array, jax.Array]:
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    weights = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(cross_entropy(logits, batch["targets"]) * weights), jnp.sum(weights)
