"""The Mosaic GPU (Hopper) flash-attention forward: against the `xla` reference, refusals, and cuda lowering.

Interpreted on CPU (Mosaic GPU's own interpreter: TMA copies, barriers and shared memory are simulated; the two
matmuls run as dots, see `flash_mosaic_gpu._Ops`), the forward output and the gradients, which go through the
Triton backward on the forward's residuals, are compared with the float32 reference on the same rounded
inputs, with the tolerances of tests/test_kernels.py. Cases cover causal or not, segment ids or not, GQA
group 1/4/8, sequences that are not multiples of the tiles, batch 2, bfloat16/float16 and head_dim 64/128,
pairwise. Lowering for cuda from CPU runs the real Mosaic GPU lowering (wgmma, layouts, TMA descriptors).
`DSJAX_KERNEL_TESTS=compiled` on an H100 runs the comparisons compiled (skipped elsewhere).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from dsjax.kernels import BlockSizes, UnsupportedError, flash_attention, select_kernel
from dsjax.kernels.blocks import default_blocks, fit_blocks
from tests.test_kernels import Case, check_against_reference
from tests.test_kernels_lowering import pretend_h100, verify_triton_ir  # noqa: F401 (fixtures)

BACKEND = "mosaic_gpu"

CASES = [
    Case(causal=True, segments=False, group=1, seq=128, dtype=jnp.bfloat16, head_dim=64, kv_heads=2),
    Case(causal=True, segments=True, group=4, seq=200, dtype=jnp.float16, head_dim=128),
    Case(causal=False, segments=False, group=8, seq=200, dtype=jnp.bfloat16, head_dim=128),
    Case(causal=False, segments=True, group=1, seq=256, dtype=jnp.float16, head_dim=64, kv_heads=2),
    Case(causal=True, segments=True, group=8, seq=320, dtype=jnp.bfloat16, head_dim=64),
]
# Forward tiles: 64 query rows (one warpgroup), key tiles of 64 or 128, so the diagonal and the padding edge
# cut tiles differently; the backward (Triton) tiles differ from the forward's. Sequences of 4+ key tiles
# (seq 200 and 320 with 64-wide tiles) refill the ring of 3 K/V slots.
BLOCKS = [BlockSizes(64, 64, 64, 32, 16, 64), BlockSizes(64, 128, 32, 64, 32, 32)]


def check(case: Case, **kernel_args):
    check_against_reference(case, backend=BACKEND, **kernel_args)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check(case, block_sizes=BLOCKS[CASES.index(case) % len(BLOCKS)])


def test_default_blocks_match_reference():
    check(Case(causal=True, segments=True, group=2, seq=136, dtype=jnp.bfloat16, head_dim=64, kv_heads=2))


def test_float32_is_refused():
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(UnsupportedError, match=r'float32.*backend="gpu"'):
        flash_attention(q, q, q, interpret=True, backend=BACKEND)


def test_head_dim_above_128_is_refused():
    q = jnp.zeros((1, 64, 1, 192), jnp.bfloat16)
    with pytest.raises(UnsupportedError, match="head_dim"):
        flash_attention(q, q, q, interpret=True, backend=BACKEND)


def test_blocks_are_validated():
    assert default_blocks(BACKEND, group=8, head_dim=128).block_q == 64
    assert fit_blocks(default_blocks(BACKEND, 1, 64), BACKEND, seq_len=40).block_k == 64  # shrunk to the minimum
    for blocks in (BlockSizes.uniform(32, 64), BlockSizes.uniform(64, 32), BlockSizes.uniform(128, 64)):
        with pytest.raises(UnsupportedError, match="mosaic_gpu"):
            fit_blocks(blocks, BACKEND, seq_len=1024)


def test_selection(monkeypatch):
    """Asked for by name only: a GPU's default stays Triton; compiled, it needs a GPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(UnsupportedError, match="only interpreted"):
        select_kernel(BACKEND, interpret=False)
    assert select_kernel(BACKEND, interpret=True) == BACKEND
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert select_kernel(None, interpret=False) == "gpu"
    assert select_kernel(BACKEND, interpret=False) == BACKEND


@pytest.mark.parametrize(
    "causal,segments,group,seq,head_dim,dtype",
    [
        (True, False, 1, 2048, 128, jnp.bfloat16),
        (True, True, 8, 1000, 128, jnp.bfloat16),
        (False, True, 4, 512, 64, jnp.float16),
    ],
)
@pytest.mark.usefixtures("verify_triton_ir", "pretend_h100")
def test_lowers_for_cuda(causal, segments, group, seq, head_dim, dtype, monkeypatch):
    """Forward and backward lower for cuda from CPU: the forward as a Mosaic GPU custom call, the backward as
    the Triton dK/dV and dQ kernels."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jax.ShapeDtypeStruct((2, seq, 2 * group, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, seq, 2, head_dim), dtype)
    segment_ids = jax.ShapeDtypeStruct((2, seq), jnp.int32) if segments else None

    def forward_backward(q, k, v, segment_ids):
        attention = lambda q, k, v: flash_attention(q, k, v, segment_ids, causal=causal, backend=BACKEND)
        out, vjp = jax.vjp(attention, q, k, v)
        return vjp(out)

    try:
        lowered = jax.jit(forward_backward).trace(q, kv, kv, segment_ids).lower(lowering_platforms=("cuda",))
    except RuntimeError as error:
        if "compilation handler" in str(error):  # newer jaxlib compiles Triton while lowering: needs a CUDA jaxlib
            pytest.skip(f"this jaxlib cannot compile Triton here: {error}")
        raise
    text = lowered.as_text()
    assert re.search(r"custom_call @mosaic_gpu", text), "no Mosaic GPU custom call in the lowered module"
    assert "dsjax_flash_fwd_mosaic_gpu" in text
    assert set(re.findall(r"dsjax_flash_([a-z]+)_gpu", text)) == {"dkdv", "dq"}
