"""The jitted train and eval steps.

One optimizer update per global batch: the batch is split into `grad_accum_steps` micro-batches that a `lax.scan`
runs one after another, summing float32 gradients; the sum is divided by the global number of weighted tokens, so the
update equals the one for the whole batch at once, however it is split or sharded. A step whose loss or gradient is
not finite leaves the state unchanged and reports `finite = 0`; the loop stops the run on it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.sharding import constrain

BATCH_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


def _micro_batches(batch: dict, steps: int) -> dict:
    """(batch, ...) -> (steps, batch // steps, ...): the leading axis is what the accumulation scan runs over."""
    return {k: v.reshape((steps, v.shape[0] // steps) + v.shape[1:]) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, grad_accum_steps: int,
                    schedule: Callable) -> Callable:
    """step(state, batch) -> (state, metrics). `loss_fn(model, batch) -> (loss_sum, weight_sum)`."""

    def summed_loss(params, micro):
        micro = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in micro.items()}
        return loss_fn(nnx.merge(graphdef, params), micro)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(state, batch):
        params = state["params"]

        def accumulate(carry, micro):
            grads, loss, weight = carry
            (micro_loss, micro_weight), micro_grads = grad_fn(params, micro)
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return (grads, loss + micro_loss, weight + micro_weight), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, weight_sum), _ = jax.lax.scan(accumulate, init, _micro_batches(batch, grad_accum_steps))
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + finite.astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": weight_sum,
                   "finite": finite.astype(jnp.int32)}
        return new_state, metrics

    return step


def make_eval_step(graphdef, loss_fn: Callable) -> Callable:
    """eval_step(params, batch) -> (loss_sum, weight_sum), for token-weighted loss and bits-per-byte."""

    def eval_step(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)

    return eval_step
