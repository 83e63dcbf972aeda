"""Memory is O(S): no S x S buffer exists in the kernels' forward + backward, at 32k tokens.

Method. CPU cannot compile the real Triton or Mosaic kernels, so we compile (never run) `jax.jit(jax.grad(...))`
of the kernels in interpret mode, where Pallas turns each kernel into XLA loops over the very same tiles: the
buffers XLA allocates are the tiles plus the O(S) inputs, outputs and residuals (output, log-sum-exp). The
compiled program's `memory_analysis().temp_size_in_bytes` is XLA's scratch peak. We check that at S = 32768
it is far below a single S x S float32 matrix (4 GiB), and that doubling S from 16k doubles it (linear), while
the `xla` reference, as a control that the measure does see S x S buffers, needs more than S x S x 4 bytes
and quadruples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dsjax.kernels import flash_attention
from dsjax.model.attention_ops import xla_attention

LONG = 32768


def _temp_bytes(attention, seq: int) -> int:
    q = jax.ShapeDtypeStruct((1, seq, 2, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, 1, 64), jnp.float32)
    segment_ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    loss = lambda q, k, v, seg: attention(q, k, v, seg).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.trace(q, kv, kv, segment_ids).lower().compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_forward_backward_memory_is_linear_in_sequence(backend):
    kernel = lambda *args: flash_attention(*args, causal=True, interpret=True, backend=backend)
    long, half = _temp_bytes(kernel, LONG), _temp_bytes(kernel, LONG // 2)
    square = LONG * LONG * 4
    assert long < square / 8, f"{long / 2**20:.0f} MiB of temporaries at {LONG} tokens"
    assert long / half < 2.2, f"temporaries grow {long / half:.2f}x when the sequence doubles"


def test_control_reference_needs_square_buffers():
    long, half = _temp_bytes(xla_attention, LONG), _temp_bytes(xla_attention, LONG // 2)
    assert long > LONG * LONG * 4
    assert long / half > 3.5
