"""`model.attention=blocked` (the CPU default of `auto`): outputs and dq, dk, dv against the `xla` reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import ModelConfig, init_model
from dsjax.model.attention_blocked import blocked_attention
from dsjax.model.attention_ops import dot_product_attention, xla_attention


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype, packed, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    segment_ids = None
    if packed:
        starts = jax.random.bernoulli(keys[4], 0.08, (batch, seq)).at[:, 0].set(True)
        segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
    return q, k, v, d_out, segment_ids


def _value_and_grads(attention, q, k, v, d_out):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(d_out))
    return jax.jit(run)(q, k, v, d_out)


# (batch, seq, heads, kv heads, head_dim, block, causal, packed): GQA groups 1, 2 and 4; a block that does not divide
# the sequence, one longer than it, one of a single position; packed documents; no causal mask.
CASES = [
    (2, 40, 4, 2, 16, 16, True, True),
    (1, 33, 4, 4, 8, 8, True, False),
    (2, 24, 4, 1, 16, 64, True, True),
    (1, 9, 2, 1, 8, 1, True, True),
    (2, 20, 6, 2, 8, 8, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}s{}h{}kv{}d{}blk{}{}{}".format(
    *c[:6], "-causal" if c[6] else "-full", "-packed" if c[7] else ""))
def test_matches_xla_reference_float32(case):
    """Output and each gradient to 2e-6 of its largest entry (observed below 1e-6): only the summation order
    differs."""
    batch, seq, heads, kv_heads, head_dim, block, causal, packed = case
    q, k, v, d_out, ids = _inputs(batch, seq, heads, kv_heads, head_dim, jnp.float32, packed)
    ours = _value_and_grads(lambda *a: blocked_attention(*a, ids, causal=causal, block=block), q, k, v, d_out)
    ref = _value_and_grads(lambda *a: xla_attention(*a, ids, causal=causal), q, k, v, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        assert error < 2e-6, f"{name}: relative error {error:.2e}"


def test_matches_xla_reference_bfloat16():
    """bfloat16 inputs, float32 accumulation in both: within bf16 rounding (2e-2 of the largest entry)."""
    q, k, v, d_out, ids = _inputs(2, 48, 4, 2, 16, jnp.bfloat16, True)
    ours = _value_and_grads(lambda *a: blocked_attention(*a, ids, block=16), q, k, v, d_out)
    ref = _value_and_grads(lambda *a: xla_attention(*a, ids), q, k, v, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert got.dtype == jnp.bfloat16, name
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        assert error < 2e-2, f"{name}: relative error {error:.2e}"


def test_no_block_above_the_diagonal_is_computed():
    """Causal blocks skip the keys after their last query: the forward's score elements are about half of S x S.

    Counted from the jaxpr (the product of each dot_general's output shape), so it cannot pass by accident."""
    q, k, v, _, _ = _inputs(1, 256, 2, 2, 8, jnp.float32, False)

    def dot_shapes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn.outvars[0].aval.shape
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from dot_shapes(inner)

    def score_elements(causal):
        jaxpr = jax.make_jaxpr(lambda *a: blocked_attention(*a, causal=causal, block=32))(q, k, v)
        shapes = list(dot_shapes(jaxpr.jaxpr))
        assert shapes  # the walk reached the custom VJP's body
        return sum(int(np.prod(s)) for s in shapes if s[-1] != 8)  # the scores' last axis is keys, not head_dim

    full, causal = score_elements(False), score_elements(True)
    assert full == 2 * 256 * 256
    assert causal == 2 * 32 * 32 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8)  # block i sees (i + 1) * 32 keys


def test_model_with_blocked_equals_model_with_xla():
    """The whole model (GQA, packed documents) gives the same loss and parameter gradients with either backend."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      dtype="float32")
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)
    _, _, _, _, ids = _inputs(2, 40, 1, 1, 1, jnp.float32, True)
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))

    def loss_and_grads(backend):
        from flax import nnx
        graphdef, params = nnx.split(init_model(cfg.replace(attention=backend), seed=0))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, positions, ids).astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads("blocked"), loss_and_grads("xla")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())


def test_auto_on_cpu_runs_blocked_and_keeps_branch_ids_on_xla():
    q, k, v, _, ids = _inputs(1, 16, 2, 1, 8, jnp.float32, True)
    np.testing.assert_array_equal(dot_product_attention(q, k, v, ids, backend="auto"),
                                  dot_product_attention(q, k, v, ids, backend="blocked"))
    branches = jnp.zeros_like(ids).at[:, 8:].set(1)
    np.testing.assert_array_equal(dot_product_attention(q, k, v, ids, branches, backend="auto"),
                                  dot_product_attention(q, k, v, ids, branches, backend="xla"))
