"""The chunked output head + cross-entropy (dsjax/train/loss.py) equals the full-logits path: loss and gradients in
float32, on packed rows with loss weights, with padding when the chunk does not divide the sequence, and on a 2x2x2
mesh with the vocabulary split over `tensor`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax import sharding as shd
from dsjax.errors import ConfigError
from dsjax.model import ModelConfig, init_model
from dsjax.model import params as model_params
from dsjax.train.loss import cross_entropy, next_token_loss, target_logps

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                  dtype="float32", loss_chunk=0)
SEQ = 26  # chunk 8: 4 chunks of 7 positions, 2 of them padding


def packed_batch(rows=4, seq=SEQ, seed=0):
    """Two documents per row (positions restart, segment ids 1 and 2), the last token of each unweighted."""
    rs = np.random.RandomState(seed)
    full = rs.randint(0, CFG.vocab_size, (rows, seq + 1))
    cut = seq // 2 - 3
    segments = np.where(np.arange(seq) < cut, 1, 2).astype(np.int32)
    positions = np.where(np.arange(seq) < cut, np.arange(seq), np.arange(seq) - cut).astype(np.int32)
    weights = rs.uniform(0.5, 1.5, (rows, seq)).astype(np.float32)
    weights[:, [cut - 1, seq - 1]] = 0
    return {"tokens": jnp.asarray(full[:, :-1], jnp.int32), "targets": jnp.asarray(full[:, 1:], jnp.int32),
            "loss_weights": jnp.asarray(weights), "segment_ids": jnp.asarray(np.broadcast_to(segments, (rows, seq))),
            "positions": jnp.asarray(np.broadcast_to(positions, (rows, seq)))}


def loss_and_grads(loss_chunk, batch, mesh=None, rules=shd.DEFAULT_RULES):
    model = init_model(CFG.replace(loss_chunk=loss_chunk), seed=0)
    graphdef, state = nnx.split(model, nnx.Param)

    def mean_loss(state, batch):
        total, weight = next_token_loss(nnx.merge(graphdef, state), batch)
        return total / weight

    fn = jax.jit(jax.value_and_grad(mean_loss))
    if mesh is None:
        return fn(state, batch)
    placed = jax.device_put(state, nnx.State(model_params.shardings(model, mesh, rules)))
    assert placed["lm_head"].sharding.spec[1] == "tensor"  # the vocabulary really is split
    with shd.use_rules(mesh, rules):
        return fn(placed, jax.device_put(batch, shd.batch_sharding(mesh, rules)))


def assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=atol)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


@functools.cache
def reference():
    """Loss and gradients from the full logits on one device (also the oracle of test_sequence_parallel.py)."""
    return loss_and_grads(0, packed_batch())


def test_chunked_loss_and_grads_equal_full_logits():
    assert_same(loss_and_grads(8, packed_batch()), reference())  # 4 chunks of 7 positions, 2 of them padding


def test_chunked_loss_on_a_2x2x2_mesh_with_the_vocab_split():
    assert_same(loss_and_grads(8, packed_batch(), shd.make_mesh((2, 2, 2))), reference())


def test_chunked_loss_never_forms_the_full_logits():
    """No array of the compiled gradient has as many logits as the whole batch: the largest holds one chunk's."""
    batch = packed_batch(rows=4, seq=64)
    model = init_model(CFG.replace(loss_chunk=8), seed=0)
    graphdef, state = nnx.split(model, nnx.Param)
    grad = jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), batch)[0])
    text = jax.jit(grad).lower(state).as_text()
    full, chunk = f"4x64x{CFG.vocab_size}x", f"4x8x{CFG.vocab_size}x"
    assert full not in text and chunk in text


def test_target_logps_for_dpo_equal_full_logits():
    batch = packed_batch()
    model = init_model(CFG.replace(loss_chunk=8), seed=0)
    logps, mean_logits = jax.jit(lambda b: target_logps(model, b))(batch)
    logits = jax.jit(lambda b: model(b["tokens"], b["positions"], b["segment_ids"]))(batch)
    np.testing.assert_allclose(logps, -cross_entropy(logits, batch["targets"]), atol=1e-5)
    np.testing.assert_allclose(mean_logits, jnp.mean(logits, axis=-1), atol=1e-6)


def test_bad_loss_chunk_is_one_sentence_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model\.loss_chunk must be a non-negative integer"):
        CFG.replace(loss_chunk=-1)
