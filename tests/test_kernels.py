"""Flash-attention kernels against the `xla` reference, interpreted on CPU: outputs and dq, dk, dv.

Both kernels (GPU/Triton and TPU/Mosaic) run every case. The cases cover the matrix (causal or not, segment
ids or not, GQA group 1/4/8, sequence lengths that are and are not multiples of the tiles, batch 2,
fp32/bf16/fp16, head_dim 64/128) pairwise rather than as a full product, to keep interpret mode cheap.

Errors are max |kernel - reference| / max |reference| per tensor. The reference runs in float32 on the same
(rounded) inputs, so the tolerance measures only the kernel's own rounding. Bounds are ~3-7x the largest error
observed over these cases:
- float32: 1e-5 (observed 1.5e-6: blockwise summation order differs from one softmax).
- bfloat16: 1.5e-2 (observed 4.8e-3, the same as the bf16 xla reference's own error against float32: the
  kernel rounds P and dS to the input dtype before the P V, dS K and dS^T Q matmuls, as the reference does).
- float16: 2e-3 (observed 5.2e-4; three more mantissa bits than bfloat16).

On a GPU or TPU, `DSJAX_KERNEL_TESTS=compiled JAX_PLATFORMS= python -m pytest tests/test_kernels.py
tests/test_kernels_segments.py` runs the same comparisons with the platform's kernel compiled, and skips the other
platform's (`experiments/device_check.sh` does this first).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.kernels import BlockSizes, UnsupportedError, flash_attention, masking
from dsjax.kernels.api import KERNEL_PLATFORM
from dsjax.model.attention_ops import xla_attention

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2, jnp.float16: 2e-3}
COMPILED = os.environ.get("DSJAX_KERNEL_TESTS", "interpret") == "compiled"


def interpret_for(backend: str) -> bool:
    """Interpret `backend`'s kernel, unless compiled runs were asked for: then run it compiled on its own
    hardware and skip it elsewhere."""
    if not COMPILED:
        return True
    platform = KERNEL_PLATFORM.get(backend, backend)
    if jax.default_backend() != platform:
        pytest.skip(f"DSJAX_KERNEL_TESTS=compiled: the {backend} kernel needs a {platform}")
    return False


@dataclasses.dataclass(frozen=True)
class Case:
    causal: bool
    segments: bool
    group: int
    seq: int
    dtype: type
    head_dim: int
    kv_heads: int = 1

    def __str__(self):
        mask = ("causal" if self.causal else "full") + ("+seg" if self.segments else "")
        return f"{mask}-g{self.group}-s{self.seq}-{jnp.dtype(self.dtype).name}-d{self.head_dim}-kv{self.kv_heads}"


CASES = [
    Case(causal=True, segments=False, group=1, seq=128, dtype=jnp.float32, head_dim=64, kv_heads=2),
    Case(causal=True, segments=True, group=4, seq=200, dtype=jnp.bfloat16, head_dim=128),
    Case(causal=False, segments=False, group=8, seq=200, dtype=jnp.float32, head_dim=128),
    Case(causal=False, segments=True, group=1, seq=256, dtype=jnp.bfloat16, head_dim=64, kv_heads=2),
    Case(causal=True, segments=True, group=8, seq=256, dtype=jnp.float32, head_dim=64),
    Case(causal=False, segments=False, group=4, seq=96, dtype=jnp.bfloat16, head_dim=64, kv_heads=2),
    Case(causal=True, segments=False, group=8, seq=72, dtype=jnp.bfloat16, head_dim=128),
    Case(causal=False, segments=True, group=4, seq=160, dtype=jnp.float16, head_dim=128),
]

# Tiles smaller than the sequences so every case crosses several of them, query and key tiles of different
# sizes so the diagonal cuts tiles unevenly; the TPU kernel's key tiles are at least one 128-lane vreg wide.
BLOCKS = {
    "gpu": [BlockSizes(32, 64, 64, 32, 16, 64), BlockSizes.uniform(64, 16)],
    "tpu": [BlockSizes(32, 128, 64, 128, 16, 128), BlockSizes.uniform(64, 128)],
}


def make_inputs(case: Case, batch: int = 2, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    heads = case.group * case.kv_heads
    q = jax.random.normal(keys[0], (batch, case.seq, heads, case.head_dim), case.dtype)
    k = jax.random.normal(keys[1], (batch, case.seq, case.kv_heads, case.head_dim), case.dtype)
    v = jax.random.normal(keys[2], (batch, case.seq, case.kv_heads, case.head_dim), case.dtype)
    do = jax.random.normal(keys[3], q.shape, case.dtype)
    segment_ids = None
    if case.segments:
        # Packed documents of random lengths: ids count up along the sequence, each row differently.
        starts = jax.random.bernoulli(keys[4], 4.0 / case.seq, (batch, case.seq))
        segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
    return q, k, v, do, segment_ids


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _value_and_vjp(attention, q, k, v, do):
    """Output and (dq, dk, dv) for output cotangent `do`, compiled as one program (cheaper than eager)."""

    def run(q, k, v, do):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(do)

    return jax.jit(run)(q, k, v, do)


def check_against_reference(case: Case, backend: str, segment_ids=None, **kernel_args):
    """Output and dq, dk, dv against float32 `xla` on the same rounded inputs; `segment_ids` replaces the case's
    own random documents when given."""
    q, k, v, do, case_segment_ids = make_inputs(case)
    segment_ids = case_segment_ids if segment_ids is None else segment_ids
    interpret = interpret_for(backend)
    kernel = lambda q, k, v: flash_attention(
        q, k, v, segment_ids, causal=case.causal, interpret=interpret, backend=backend, **kernel_args
    )
    reference = lambda q, k, v: xla_attention(q, k, v, segment_ids, causal=case.causal)
    out, grads = _value_and_vjp(kernel, q, k, v, do)
    up = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = _value_and_vjp(reference, up(q), up(k), up(v), up(do))

    assert out.dtype == q.dtype and out.shape == q.shape
    tolerance = TOLERANCE[case.dtype]
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert actual.shape == expected.shape and actual.dtype == q.dtype, name
        error = relative_error(actual, expected)
        assert error < tolerance, f"{name}: relative error {error:.2e} above {tolerance:.0e} ({case}, {backend})"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, case):
    blocks = BLOCKS[backend][CASES.index(case) % len(BLOCKS[backend])]
    check_against_reference(case, backend=backend, block_sizes=blocks)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_default_blocks_match_reference(backend):
    """The platform's default tiles (clamped to a short sequence) give the same answer."""
    check_against_reference(
        Case(causal=True, segments=True, group=2, seq=136, dtype=jnp.float32, head_dim=64, kv_heads=2),
        backend=backend,
    )


def test_gpu_wide_group_sums_partial_dkdv():
    """Groups wider than one GPU tile (16 query heads per K/V head) split over tiles and sum dK/dV after."""
    check_against_reference(
        Case(causal=True, segments=False, group=16, seq=64, dtype=jnp.float32, head_dim=64),
        backend="gpu", block_q=16, block_k=32,
    )


def test_gpu_odd_head_dim_is_padded():
    """A head_dim that is no power of two is zero-padded for Triton and sliced back."""
    check_against_reference(
        Case(causal=True, segments=False, group=2, seq=64, dtype=jnp.float32, head_dim=48), backend="gpu"
    )


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kv_never_repeated_per_query_head(backend):
    """GQA inside the kernel: the pallas_calls receive K/V with kv_heads heads, and the grid has one program
    per (K/V head, tile), so K/V are neither copied per query head nor read once per query head."""
    case = Case(causal=True, segments=False, group=8, seq=128, dtype=jnp.float32, head_dim=64, kv_heads=2)
    q, k, v, do, _ = make_inputs(case)
    interpret = interpret_for(backend)
    step = lambda q, k, v: jax.vjp(lambda *a: flash_attention(*a, interpret=interpret, backend=backend), q, k, v)[1](do)
    calls = [eqn for eqn in jax.make_jaxpr(step)(q, k, v).eqns if eqn.primitive.name == "pallas_call"]
    assert len(calls) == 3  # forward, dK/dV, dQ
    for eqn in calls:
        kv_operands = [var.aval.shape for var in eqn.invars[1:3]]
        assert all(case.kv_heads in shape and case.kv_heads * case.group not in shape for shape in kv_operands)
        grid = eqn.params["grid_mapping"].grid
        heads_axis = grid[2] if backend == "gpu" else grid[1]
        assert heads_axis == case.kv_heads, grid


def _visible_tiles(nq, nk, bq, bk, seq, causal):
    """Brute force: for each (query tile, key tile), is any / every real query-key pair visible?"""
    q = np.arange(nq * bq)[:, None]
    k = np.arange(nk * bk)[None, :]
    visible = (q >= k) if causal else np.broadcast_to(k < seq, (q.size, k.size))
    real_q = np.broadcast_to(q < seq, visible.shape)
    tiles = visible.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
    real = real_q.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
    any_visible = (tiles & real).any(axis=(2, 3))
    all_visible = tiles.all(axis=(2, 3))
    return any_visible, all_visible, real.any(axis=(2, 3))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bq,bk,seq", [(16, 16, 64), (32, 16, 80), (16, 64, 100), (64, 32, 130)])
def test_tile_ranges_skip_exactly_the_invisible_tiles(causal, bq, bk, seq):
    """Tiles visited are those with a visible real pair; tiles visited unmasked are fully visible."""
    padded = -(-seq // max(bq, bk)) * max(bq, bk)
    nq, nk = padded // bq, padded // bk
    any_visible, all_visible, has_real_query = _visible_tiles(nq, nk, bq, bk, seq, causal)
    for i in range(nq):
        unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=seq, causal=causal)
        visited = np.arange(nk) < end
        if has_real_query[i].any():
            np.testing.assert_array_equal(visited, any_visible[i], err_msg=f"query tile {i}")
        assert all_visible[i, :unmasked_end].all(), f"query tile {i} skips a mask it needs"
    for j in range(nk):
        start, masked_end, end = masking.q_blocks(j, block_q=bq, block_k=bk, seq_len=seq, causal=causal)
        visited = (np.arange(nq) >= start) & (np.arange(nq) < end)
        np.testing.assert_array_equal(visited, any_visible[:, j], err_msg=f"key tile {j}")
        if causal:
            assert all_visible[masked_end:end, j].all(), f"key tile {j} skips a mask it needs"


def test_rejects_what_it_cannot_run():
    q = jnp.zeros((1, 64, 2, 64))
    with pytest.raises(UnsupportedError, match="platform 'cpu'"):
        flash_attention(q, q, q, backend="tpu")  # compiled kernels need their hardware
    with pytest.raises(UnsupportedError, match="interpret=True"):
        flash_attention(q, q, q)
    with pytest.raises(UnsupportedError, match="power of two"):
        flash_attention(q, q, q, interpret=True, backend="gpu", block_q=48)
    with pytest.raises(UnsupportedError, match="at least 128"):
        flash_attention(q, q, q, interpret=True, backend="tpu", block_k=64)
    with pytest.raises(UnsupportedError, match="not a multiple"):
        flash_attention(q, q[:, :, :1].repeat(3, axis=2), q[:, :, :1].repeat(3, axis=2), interpret=True)
