"""Losses. A loss takes (model, batch) and returns (sum of weighted per-token losses, sum of weights).

Returning sums, not means, lets gradient accumulation and data parallelism combine micro-batches exactly: the step
divides by the global weight total once. Pretraining and SFT use `next_token_loss` (SFT zeroes the prompt's
`loss_weights`); DPO brings its own.

The output head and the cross-entropy run over chunks of `model.loss_chunk` sequence positions (the paper's "in
place" cross-entropy): a scan whose body is rematerialized, so at most one chunk's float32 logits (batch, chunk,
vocab) exist at a time, forward or backward, instead of the whole (batch, seq, vocab) and its gradient. A sequence
no longer than the chunk (or `loss_chunk=0`) takes the plain path: logits in full, then `cross_entropy`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dsjax.sharding import constrain


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token -log p(target), computed in float32 from logits of any dtype."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def token_values(model, batch: dict, fn: Callable, chunk: int | None = None) -> tuple[jax.Array, ...]:
    """fn(logits (b, c, vocab) float32, targets (b, c)) -> a tuple of (b, c) per-token arrays, evaluated chunk by
    chunk of the sequence and returned as (batch, seq) arrays; the full logits are never formed.

    chunk: sequence positions per chunk; None: `model.config.loss_chunk`; 0: one chunk (the full logits).
    """
    chunk = model.config.loss_chunk if chunk is None else chunk
    targets = batch["targets"]
    rows, seq = targets.shape
    if not chunk or chunk >= seq:
        return tuple(fn(model(batch["tokens"], batch["positions"], batch["segment_ids"]), targets))
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    n = -(-seq // chunk)
    size = -(-seq // n)
    if n * size != seq:  # padded positions are computed and then cut off
        hidden = jnp.pad(hidden, ((0, 0), (0, n * size - seq), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * size - seq)))
    # Chunk k holds positions k, k + n, k + 2n, ...: a sequence split in contiguous blocks over devices (sequence
    # parallelism) splits every chunk the same way, so taking a chunk moves no data.
    hs = constrain(hidden.reshape(rows, size, n, -1).transpose(2, 0, 1, 3), (None, "batch", "act_seq", "act_embed"))
    ts = targets.reshape(rows, size, n).transpose(2, 0, 1)

    def body(carry, xs):
        h, t = xs
        return carry, tuple(fn(model.logits(h), t))

    _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, (hs, ts))
    return tuple(o.transpose(1, 2, 0).reshape(rows, n * size)[:, :seq] for o in out)


def next_token_loss(model, batch) -> tuple[jax.Array, jax.Array]:
    (nll,) = token_values(model, batch, lambda logits, targets: (cross_entropy(logits, targets),))
    weights = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def target_logps(model, batch) -> tuple[jax.Array, jax.Array]:
    """(log p(target), the mean logit over the vocabulary), each (batch, seq), chunked like the loss: what DPO reads
    from the full logits (dsjax/train/tasks/dpo.py `response_logps`), without forming them."""
    return token_values(model, batch, lambda logits, targets: (-cross_entropy(logits, targets),
                                                                jnp.mean(logits, axis=-1)))
