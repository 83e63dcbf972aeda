"""`model.attention=pallas`: a tiny model's training step matches `xla`; the platform switch and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.kernels import INTERPRET_ENV
from dsjax.model import ConfigError, ModelConfig, init_model
from dsjax.model.attention_ops import dot_product_attention, resolve_backend

# head_dim 64; four query heads share one K/V head (GQA group 4).
TINY = ModelConfig(
    vocab_size=128, d_model=256, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=256, max_seq_len=128, dtype="float32"
)


def _packed_batch(batch=2, seq=80, seed=0):
    """Tokens with packed documents: segment ids and positions restarting per document."""
    keys = jax.random.split(jax.random.key(seed), 2)
    tokens = jax.random.randint(keys[0], (batch, seq), 0, TINY.vocab_size)
    starts = jax.random.bernoulli(keys[1], 0.05, (batch, seq)).at[:, 0].set(True)
    segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
    index = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    doc_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return tokens, index - doc_start, segment_ids


def _loss_and_grads(attention: str):
    """Next-token cross-entropy of the tiny model and its parameter gradients: one training step's work."""
    model = init_model(TINY.replace(attention=attention), seed=0)
    graphdef, params = nnx.split(model)
    tokens, positions, segment_ids = _packed_batch()

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)[:, :-1].astype(jnp.float32)
        targets = tokens[:, 1:]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_training_step_matches_xla(kernel, monkeypatch):
    """Same loss and gradients (float32: loss to 1e-6 relative, each gradient to 1e-5 of its largest entry;
    observed 0 and 6e-7)."""
    monkeypatch.setenv(INTERPRET_ENV, kernel)
    loss, grads = _loss_and_grads("pallas")
    ref_loss, ref_grads = _loss_and_grads("xla")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves)
    for path_and_leaf, ref in zip(jax.tree_util.tree_leaves_with_path(grads), ref_leaves):
        path, leaf = path_and_leaf
        scale = float(jnp.abs(ref).max())
        error = float(jnp.abs(leaf - ref).max()) / scale
        assert scale > 0 and error < 1e-5, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def test_pallas_on_cpu_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    q = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ConfigError, match=r"model\.attention='pallas' needs a GPU or TPU.*'cpu'"):
        dot_product_attention(q, q, q, backend="pallas")


def test_bad_interpret_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "cuda")
    q = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ConfigError, match=r"model\.attention='pallas'.*DSJAX_PALLAS_INTERPRET"):
        dot_product_attention(q, q, q, backend="pallas")


def test_auto_resolves_per_platform(monkeypatch):
    assert resolve_backend("auto") == "blocked"  # the test platform is CPU
    assert resolve_backend("auto", branch_ids=True) == "xla"  # only the reference takes branch ids
    assert resolve_backend("pallas") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backend("auto") == "cudnn"
