"""The train state, a plain pytree: {"params": nested dict, "opt_state": optax state, "step": int32 scalar}.

Parameters live as a pure dict (what `nnx.to_pure_dict` gives) so optax, Orbax and jit all see ordinary pytrees; the
model is rebuilt from them with `nnx.merge(graphdef, params)` inside traced code. Shardings come from each parameter's
logical axes through the config's rules; the Adam moments share their parameter's sharding, split further over
`data` under ZeRO-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsjax import sharding as shd
from dsjax.model import ModelConfig, Transformer, abstract_model
from dsjax.model.params import logical_axes


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def param_shardings(model_cfg: ModelConfig, mesh, rules, zero1: bool = False) -> dict:
    """NamedSharding for every parameter, as a nested dict shaped like the params."""
    state = nnx.state(abstract_model(model_cfg), nnx.Param)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        spec = shd.logical_to_spec(logical_axes(var), rules, shape, mesh)
        if zero1:
            spec = shd.zero1_spec(spec, shape, mesh)
        flat[tuple(str(k) for k in path)] = NamedSharding(mesh, spec)
    return _nest(flat)


def graphdef_of(model_cfg: ModelConfig):
    return nnx.graphdef(abstract_model(model_cfg))


def create_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, params=None) -> dict:
    """A fresh train state (traced under jit so every array is born on its shard)."""
    if params is None:
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(params=seed)), nnx.Param))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_shardings(model_cfg: ModelConfig, tx, mesh, rules, zero1: bool) -> dict:
    """Shardings for the whole train state; the scalar step is replicated."""
    params = param_shardings(model_cfg, mesh, rules)
    moments = param_shardings(model_cfg, mesh, rules, zero1=zero1)
    abstract = jax.eval_shape(lambda: create_state(model_cfg, tx, 0))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], moments,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated}


def abstract_state(model_cfg: ModelConfig, tx, shardings) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for Orbax, and the input to AOT compilation."""
    abstract = jax.eval_shape(lambda: create_state(model_cfg, tx, 0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
