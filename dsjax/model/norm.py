"""RMSNorm (pre-norm, eps 1e-6 in DeepSeek LLM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.model import params


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, with the statistics in float32 whatever the compute dtype.

    The normalized value is cast back to the input dtype before the gain is applied, the order Hugging Face's
    LlamaRMSNorm uses, so bf16 runs round the same way as the released model.
    `layers` adds a leading stacked-layer dimension (see `dsjax.model.block`).
    """

    def __init__(self, dim: int, eps: float, dtype, layers: int | None = None):
        shape, axes = (dim,), ("embed",)
        if layers is not None:
            shape, axes = (layers,) + shape, ("layers",) + axes
        self.weight = params.ones(shape, axes, dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
