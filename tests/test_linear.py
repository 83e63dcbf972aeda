"""dsjax/model/linear.py: the flattened projections equal the einsums they replace, and remove XLA:CPU's copies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.model.config import ModelConfig
from dsjax.model.linear import project
from dsjax.model.mlp import MLP

RNG = np.random.RandomState(0)


def rand(*shape, dtype=jnp.float32):
    return jnp.asarray(RNG.randn(*shape), dtype)


@pytest.mark.parametrize("spec, x_shape, w_shape, n_in", [
    ("bsd,df->bsf", (3, 5, 8), (8, 12), 1),          # q/k/v-style input side, MLP
    ("bsd,dhk->bshk", (3, 5, 8), (8, 2, 4), 1),      # per-head weights
    ("bshk,hkd->bsd", (3, 5, 2, 4), (2, 4, 8), 2),   # the output projection
])
def test_project_equals_einsum_forward_and_gradients(spec, x_shape, w_shape, n_in):
    x, w = rand(*x_shape), rand(*w_shape)
    out_shape = jnp.einsum(spec, x, w).shape
    cot = rand(*out_shape)
    ours = lambda x, w: jnp.sum(project(x, w, n_in) * cot)
    ref = lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * cot)
    np.testing.assert_allclose(project(x, w, n_in), jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_project_casts_the_weight_and_returns_out_dtype():
    x, w = rand(2, 3, 8, dtype=jnp.bfloat16), rand(8, 16)
    out = project(x, w, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 16)
    want = jnp.einsum("bsd,dv->bsv", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert project(x, w).dtype == jnp.bfloat16


def test_project_refuses_mismatched_features():
    with pytest.raises(ValueError, match=r"input features \(8,\) do not match the weight's \(6,\)"):
        project(rand(2, 8), rand(6, 4))


def strided_copies(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"= (f32\[[0-9,]*\])\{[0-9,]*\} (?:copy|transpose)\(", text)


def test_mlp_backward_has_no_transposing_copies_on_cpu():
    """The issue-17 regression: einsum weight gradients made XLA:CPU copy (tokens, features) arrays transposed."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96, dtype="float32")
    graphdef, params = nnx.split(MLP(cfg, nnx.Rngs(params=0)))
    x = rand(4, 64, 32)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
    assert strided_copies(jax.grad(loss, (0, 1)), params, x) == []

    # The oracle that the check can fail: the same MLP written as einsums has them.
    def einsum_mlp(p, x):
        gate = jnp.einsum("bsd,df->bsf", x, p["gate_proj"][...])
        up = jnp.einsum("bsd,df->bsf", x, p["up_proj"][...])
        return jnp.sum(jnp.einsum("bsf,fd->bsd", jax.nn.silu(gate) * up, p["down_proj"][...]) ** 2)
    assert strided_copies(jax.grad(einsum_mlp, (0, 1)), params, x)
