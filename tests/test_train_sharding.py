"""Sharded training on 8 simulated CPU devices equals the 1-device run, and the state really is split."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from dsjax import sharding as shd
from dsjax.config import model_config
from dsjax.checkpoint import restore_model
from dsjax.train.trainer import train
from dsjax.train.optimizer import make_optimizer, make_schedule
from dsjax.train.state import create_state, state_shardings
from tests.train_utils import small_config, synthetic_task


# Float32 tolerance for parameters after 3 AdamW steps at lr 1e-2: sharding changes the order of reductions (ulp-level
# gradient differences), and Adam's first updates, lr * m / sqrt(v), amplify that for near-zero gradients. 1e-4 is 1%
# of one step's size; a real sharding bug (a missing reduction, a wrong slice) moves parameters by a whole step.
PARAM_ATOL = 1e-4


def run(tmp_path, name, mesh_shape, **train_kw):
    config = small_config(steps=3, **train_kw)
    config.mesh.shape = mesh_shape
    workdir = tmp_path / name
    train(config, workdir, task=synthetic_task())
    losses = [r["loss"] for r in map(eval, (workdir / "metrics.jsonl").read_text().replace("null", "None").splitlines())]
    params = nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param))
    return losses, params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "one_device", (1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_mesh_matches_single_device(tmp_path, reference, mesh_shape):
    ref_losses, ref_params = reference
    losses, params = run(tmp_path, "mesh", mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, reference):
    ref_losses, ref_params = reference
    losses, params = run(tmp_path, "accum", (2, 1, 1), grad_accum_steps=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4)


def _sharded_state(mesh_shape, zero1=True):
    config = small_config()
    cfg = model_config(config)
    mesh = shd.make_mesh(mesh_shape)
    tx = make_optimizer(config.optim, make_schedule(config.optim, 1e-3, 10))
    shardings = state_shardings(cfg, tx, mesh, shd.DEFAULT_RULES, zero1)
    state = jax.jit(lambda: create_state(cfg, tx, 0), out_shardings=shardings)()
    mu = state["opt_state"][1][0].mu
    return state["params"], mu


def _split_factor(array):
    shard = array.addressable_shards[0].data.shape
    return math.prod(array.shape) // math.prod(shard)


def test_fsdp_splits_every_weight_and_moment():
    params, mu = _sharded_state((1, 8, 1))
    for tree in (params, mu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if leaf.ndim >= 2 and "embed" not in str(path[-1]):
                assert _split_factor(leaf) == 8, path
    assert params["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_zero1_splits_optimizer_state_over_data_only():
    params, mu = _sharded_state((8, 1, 1))
    assert _split_factor(params["layers"]["mlp"]["up_proj"]) == 1  # parameters replicated over data
    assert _split_factor(mu["layers"]["mlp"]["up_proj"]) == 8  # Adam moments split 8 ways
    assert _split_factor(mu["lm_head"]) == 8


def test_mixed_mesh_uses_every_axis():
    params, mu = _sharded_state((2, 2, 2))
    q = params["layers"]["attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert _split_factor(q) == 4
    assert _split_factor(mu["layers"]["attn"]["q_proj"]) == 8
    assert params["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_pallas_kernel_trains_on_a_mesh_like_xla(tmp_path, monkeypatch):
    """attention=pallas (interpreted) under a 2x2x2 mesh: each device runs the kernel on its batch rows and heads
    (shard_map), and the run matches the xla reference on the same mesh."""
    monkeypatch.setenv("DSJAX_PALLAS_INTERPRET", "1")
    results = {}
    for attention in ("xla", "pallas"):
        config = small_config(steps=2)
        config.model.update(d_model=128, n_heads=2, n_kv_heads=2, attention=attention)
        config.mesh.shape = (2, 2, 2)
        train(config, tmp_path / attention, task=synthetic_task())
        results[attention] = jax.tree.leaves(nnx.to_pure_dict(nnx.state(restore_model(tmp_path / attention),
                                                                          nnx.Param)))
    for a, b in zip(results["pallas"], results["xla"]):
        np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4)


def test_kernel_backends_run_per_shard(monkeypatch):
    monkeypatch.setenv("DSJAX_PALLAS_INTERPRET", "1")
    from dsjax.model.attention_ops import dot_product_attention

    mesh = shd.make_mesh((2, 2, 2))
    q = jax.ShapeDtypeStruct((4, 64, 4, 64), np.float32)
    kv = jax.ShapeDtypeStruct((4, 64, 2, 64), np.float32)
    with shd.use_rules(mesh, shd.DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, backend="pallas"))(q, kv, kv))
    # Each device gets 1 of the 4 rows (data x fsdp) and 2 of the 4 query heads with their 1 of 2 K/V heads.
    assert "shard_map" in jaxpr and "f32[1,64,2,64]" in jaxpr and "f32[1,64,1,64]" in jaxpr
