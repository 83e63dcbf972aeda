"""The jitted train and eval steps.

A task's loss is `loss(model, batch, frozen) -> (loss_sum, weight_sum, aux)`: sums, not means, and `aux` a dict of
further sums (DPO's rewards, accuracies). One optimizer update per global batch: the batch is split into
`grad_accum_steps` micro-batches that a `lax.scan` runs one after another, summing float32 gradients, the loss, the
weights and every aux entry; the sums are divided by the global weight total once, so the update and the reported
metrics equal those of the whole batch at once, however it is split or sharded. `frozen` is state the loss reads but
never trains (a reference model): no gradient, no optimizer state.

A step whose loss or gradient is not finite leaves the state unchanged and reports `finite = 0`; the trainer stops
the run on it before anything is saved.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.sharding import constrain


def _micro_batches(batch: dict, steps: int) -> dict:
    """(batch, ...) -> (steps, batch // steps, ...): the leading axis is what the accumulation scan runs over."""
    return {k: v.reshape((steps, v.shape[0] // steps) + v.shape[1:]) for k, v in batch.items()}


def _constrain_batch(batch: dict) -> dict:
    return {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, grad_accum_steps: int,
                    schedule: Callable) -> Callable:
    """step(state, batch) -> (state, metrics); metrics hold loss, grad_norm, lr, tokens, finite and aux means."""

    def summed_loss(params, frozen, micro):
        loss, weight, aux = loss_fn(nnx.merge(graphdef, params), _constrain_batch(micro), frozen)
        return loss, (weight, aux)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(state, batch):
        params, frozen = state["params"], state.get("frozen")

        def accumulate(carry, micro):
            grads, loss_sum, weight_sum = carry
            (loss, (weight, aux)), micro_grads = grad_fn(params, frozen, micro)
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return (grads, loss_sum + loss, weight_sum + weight), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, weight_sum), aux = jax.lax.scan(accumulate, init, _micro_batches(batch, grad_accum_steps))
        sums = {"loss": loss_sum, "weight": weight_sum, "aux": jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)}
        denom = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = sums["loss"] / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = dict(state, params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                         step=state["step"] + finite.astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": sums["weight"],
                   "finite": finite.astype(jnp.int32), **{k: v / denom for k, v in sums["aux"].items()}}
        return new_state, metrics

    return step


def jit_train_step(graphdef, tx, loss_fn, grad_accum_steps: int, schedule, shardings, batch_sharding):
    """The jitted train step of a run: state in and out on its shardings, donated; metrics replicated.

    One function for the trainer and for `--plan` (dsjax/train/plan.py), so what the plan compiles for a target is
    exactly what the run executes.
    """
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(make_train_step(graphdef, tx, loss_fn, grad_accum_steps, schedule),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))


def make_eval_step(graphdef, loss_fn: Callable) -> Callable:
    """eval_step(params, frozen, batch) -> {"loss", "weight", "aux"} sums, added up over the held-out batches."""

    def eval_step(params, frozen, batch):
        loss, weight, aux = loss_fn(nnx.merge(graphdef, params), _constrain_batch(batch), frozen)
        return {"loss": loss, "weight": weight, "aux": aux}

    return eval_step
