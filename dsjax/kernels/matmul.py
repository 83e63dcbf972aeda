"""The one matmul helper both kernels use: float32 accumulation always, full float32 precision for fp32 inputs."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Contraction patterns for 2-D tiles: a @ b.T (scores, dP) and a.T @ b (dK, dV).
NT = ((1,), (1,))
TN = ((0,), (0,))
NN = ((1,), (0,))


def dot(a, b, contract=NN):
    """a (.T) @ b (.T) in float32. fp32 inputs ask for HIGHEST so Triton uses IEEE fp32 rather than TF32 and
    Mosaic does full-precision passes; bf16/fp16 use the native tensor-core/MXU path."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)
