"""The projections: x's trailing feature axes times a weight's leading ones, as one 2-D matmul over all tokens.

Written as einsums over (batch, seq, ...), the backward's weight gradients contract over two axes (batch, seq), and
XLA:CPU's dot canonicalization lays one operand out transposed for them: a strided copy of a (tokens, features)
array per projection that took more of the train step than the matmuls (issue 17; experiments/bench_train_cpu.py).
Flattened to (tokens, features) x (features, out), every product of the forward and backward is a 2-D matmul whose
operands the CPU kernels read as laid out. The flattening reshapes merge contiguous axes only (free), the numbers
are the einsum's up to summation order, and remat's `save_dots` still sees a plain `dot_general` to keep.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contracts x's last `n_in` axes with w's first `n_in` axes: (..., *in) x (*in, *out) -> (..., *out).

    w is cast to x's dtype (the compute dtype); the result is in `out_dtype` (default: x's dtype).
    """
    lead, feat_in = x.shape[:-n_in], x.shape[-n_in:]
    if tuple(w.shape[:n_in]) != tuple(feat_in):
        raise ValueError(f"project: input features {feat_in} do not match the weight's {tuple(w.shape[:n_in])}.")
    feat_out = w.shape[n_in:]
    x2 = x.reshape(math.prod(lead), math.prod(feat_in))
    w2 = w.astype(x.dtype).reshape(math.prod(feat_in), math.prod(feat_out))
    out = jax.lax.dot_general(x2, w2, (((1,), (0,)), ((), ())), preferred_element_type=jnp.dtype(out_dtype or x.dtype))
    return out.reshape(lead + feat_out)
