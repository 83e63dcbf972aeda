"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import jax
from flax import nnx

from dsjax.model import params
from dsjax.model.config import ModelConfig
from dsjax.model.linear import project
from dsjax.sharding import constrain


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int | None = None):
        lead, lead_axes = ((layers,), ("layers",)) if layers is not None else ((), ())
        make = lambda shape, axes: params.normal(rngs, lead + shape, lead_axes + axes, cfg.init_std, cfg.weight_dtype)
        self.gate_proj = make((cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        self.up_proj = make((cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        self.down_proj = make((cfg.d_ff, cfg.d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(x, self.gate_proj[...])
        up = project(x, self.up_proj[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
        return project(hidden, self.down_proj[...])
