"""Parameter creation with logical axis names.

Every weight is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension, e.g. `("embed", "mlp")`).
`dsjax.sharding` maps those names to mesh axes from the config, so the model code never mentions a mesh.
Names used: layers, vocab (output head), embed_vocab (input embedding), embed, heads, kv_heads, head_dim, mlp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def normal(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    """A weight drawn from N(0, std^2) (the paper initializes every matrix with std 0.006)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def ones(shape, axes, dtype) -> nnx.Param:
    """A norm gain, initialized to one."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=tuple(axes))


def logical_axes(variable) -> tuple:
    """The logical axis names of a parameter (empty tuple when it has none)."""
    return tuple(variable.get_metadata().get("logical_axes", ()))


def axes_tree(model) -> dict:
    """The logical axes of every parameter, as a nested dict shaped like `nnx.to_pure_dict` of the params."""
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def shardings(model, mesh, rules, zero1: bool = False) -> dict:
    """A NamedSharding per parameter from its logical axes and the rules (works on abstract models): how the
    trainer, generation and evaluation all place a model on a mesh."""
    from dsjax import sharding

    abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return sharding.tree_shardings(abstract, axes_tree(model), mesh, rules, zero1=zero1)
