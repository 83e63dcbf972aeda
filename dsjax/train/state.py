"""The train state, a plain pytree: {"params": nested dict, "opt_state": optax state, "step": int32 scalar}, plus
"frozen" when the task has state it reads but never trains (see tasks/base.py `Frozen`).

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
from dsjax.model import params as model_params


def param_axes(model_cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a nested dict shaped like the params."""
    return model_params.axes_tree(abstract_model(model_cfg))


def abstract_params(model_cfg: ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param))


def param_shardings(model_cfg: ModelConfig, mesh, rules, zero1: bool = False) -> dict:
    """NamedSharding for every parameter, as a nested dict shaped like the params."""
    return model_params.shardings(abstract_model(model_cfg), mesh, rules, zero1=zero1)


def graphdef_of(model_cfg: ModelConfig):
    return nnx.graphdef(abstract_model(model_cfg))


def create_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, params=None) -> dict:
    """A fresh train state (traced under jit so every array is born on its shard)."""
    if params is None:
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(params=seed)), nnx.Param))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_shardings(model_cfg: ModelConfig, tx, mesh, rules, zero1: bool, frozen=None) -> dict:
    """Shardings for the whole train state; the scalar step is replicated, a frozen subtree split by its axes."""
    params = param_shardings(model_cfg, mesh, rules)
    moments = param_shardings(model_cfg, mesh, rules, zero1=zero1)
    abstract = jax.eval_shape(lambda: create_state(model_cfg, tx, 0))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], moments,
                                transform_non_params=lambda _: replicated)
    out = {"params": params, "opt_state": opt, "step": replicated}
    if frozen is not None:
        out["frozen"] = shd.tree_shardings(frozen.abstract, frozen.axes, mesh, rules)
    return out


def abstract_state(model_cfg: ModelConfig, tx, shardings, frozen=None) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for Orbax, and the input to AOT compilation."""
    abstract = jax.eval_shape(lambda: create_state(model_cfg, tx, 0))
    if frozen is not None:
        abstract["frozen"] = frozen.abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
