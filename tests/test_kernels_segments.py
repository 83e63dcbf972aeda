"""Segment-range tile skipping: with packed documents the kernels visit only tiles that can share a document.

`masking.segment_ranges` is checked against brute force (it must keep every tile pair that shares an id, and for
ids that never decrease, as packing makes them, nothing else); the kernels, interpreted, are checked against the
`xla` reference on many short documents and on ids in no order; and each kernel is shown to read its ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.kernels import BlockSizes, flash_attention, masking
from tests.test_kernels import Case, _value_and_vjp, check_against_reference, interpret_for, make_inputs


def _packed_ids(rng, batch, seq, mean_len):
    starts = rng.random((batch, seq)) < 1.0 / mean_len
    return np.cumsum(starts, axis=1).astype(np.int32)


def _shares_id(ids, rows, cols):
    """Brute force: (batch, row tiles, col tiles), True where the two tiles hold a common id."""
    batch, seq = ids.shape
    same = ids[:, :, None] == ids[:, None, :]
    return same.reshape(batch, seq // rows, rows, seq // cols, cols).any(axis=(2, 4))


@pytest.mark.parametrize("rows,cols", [(16, 16), (16, 64), (64, 16), (32, 128)])
def test_segment_ranges_keep_every_shared_tile_and_no_other_when_packed(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    for mean_len in (8, 40, 300, 10_000):  # many tiny documents ... one document
        ids = _packed_ids(rng, 3, 512, mean_len)
        lo, hi = (np.asarray(x) for x in masking.segment_ranges(jnp.asarray(ids), block_rows=rows, block_cols=cols))
        visited = (np.arange(512 // cols) >= lo[..., None]) & (np.arange(512 // cols) < hi[..., None])
        np.testing.assert_array_equal(visited, _shares_id(ids, rows, cols), err_msg=f"mean document {mean_len}")


def test_segment_ranges_stay_correct_for_ids_in_no_order():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, (2, 256)).astype(np.int32)
    ids[1, 100:] = 9  # a long run, then more disorder on the other row
    lo, hi = (np.asarray(x) for x in masking.segment_ranges(jnp.asarray(ids), block_rows=16, block_cols=32))
    visited = (np.arange(8) >= lo[..., None]) & (np.arange(8) < hi[..., None])
    shares = _shares_id(ids, 16, 32)
    assert not (shares & ~visited).any(), "a tile pair sharing an id would be skipped"


def test_packed_batches_skip_most_tiles():
    """512-token documents in 4096-token rows: the forward visits about one eighth of the causal triangle."""
    ids = jnp.asarray(np.arange(4096, dtype=np.int32)[None] // 512)
    lo, hi = masking.segment_ranges(ids, block_rows=128, block_cols=64)
    causal_end = (np.arange(32) + 1) * 2  # key tiles of 64 up to each 128-query tile's diagonal
    visited = np.minimum(np.asarray(hi[0]), causal_end) - np.asarray(lo[0])
    assert visited.sum() / causal_end.sum() < 0.16


CASES = [
    Case(causal=True, segments=True, group=4, seq=200, dtype=jnp.float32, head_dim=64),
    Case(causal=False, segments=True, group=1, seq=256, dtype=jnp.bfloat16, head_dim=64, kv_heads=2),
    Case(causal=True, segments=True, group=8, seq=130, dtype=jnp.bfloat16, head_dim=128),
]
BLOCKS = {"gpu": BlockSizes(32, 64, 64, 16, 16, 32), "tpu": BlockSizes(32, 128, 64, 128, 16, 128)}


def _check(case, backend, segment_ids):
    check_against_reference(case, backend, segment_ids, block_sizes=BLOCKS[backend])


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_many_short_documents_match_reference(backend, case):
    """Documents of ~12 tokens: nearly every tile is skipped, the rest must still be exact."""
    ids = _packed_ids(np.random.default_rng(1), 2, case.seq, 12)
    _check(case, backend, jnp.asarray(ids))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_ids_in_no_order_match_reference(backend):
    """Ids that repeat out of order (not what packing makes, but allowed) lose no visible pair."""
    ids = np.random.default_rng(2).integers(0, 3, (2, 96)).astype(np.int32)
    ids[0, 40:60] = 7
    _check(Case(causal=True, segments=True, group=2, seq=96, dtype=jnp.float32, head_dim=64), backend, jnp.asarray(ids))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_each_kernel_reads_its_ranges(backend, monkeypatch):
    """Emptying one kernel's ranges zeroes exactly what that kernel computes: the ranges are wired in."""
    case = Case(causal=True, segments=True, group=2, seq=128, dtype=jnp.float32, head_dim=64)
    q, k, v, do, _ = make_inputs(case)
    ids = jnp.asarray(_packed_ids(np.random.default_rng(3), 2, case.seq, 30))
    blocks = BLOCKS[backend]
    tiles = {  # (rows, cols) each kernel asks segment_ranges for
        "forward": (blocks.block_q, blocks.block_k),
        "dkdv": (blocks.block_k_dkv, blocks.block_q_dkv),
        "dq": (blocks.block_q_dq, blocks.block_k_dq),
    }
    assert len(set(tiles.values())) == 3
    real = masking.segment_ranges
    interpret = interpret_for(backend)
    run = lambda: _value_and_vjp(
        lambda q, k, v: flash_attention(q, k, v, ids, interpret=interpret, backend=backend, block_sizes=blocks),
        q, k, v, do,
    )
    out, (dq, dk, dv) = run()
    for emptied, changed in (("forward", "out"), ("dkdv", "dk"), ("dq", "dq")):

        def narrowed(segment_ids, *, block_rows, block_cols, emptied=emptied):
            lo, hi = real(segment_ids, block_rows=block_rows, block_cols=block_cols)
            return (lo, lo) if (block_rows, block_cols) == tiles[emptied] else (lo, hi)

        monkeypatch.setattr(masking, "segment_ranges", narrowed)
        jax.clear_caches()
        got = dict(zip(("out", "dq", "dk", "dv"), (lambda r: (r[0], *r[1]))(run())))
        monkeypatch.setattr(masking, "segment_ranges", real)
        if changed == "out":
            assert not np.allclose(got["out"], out, atol=1e-3), "the forward ignored its ranges"
        else:
            np.testing.assert_array_equal(got[changed], 0.0, err_msg=f"the {emptied} kernel ignored its ranges")
            np.testing.assert_allclose(got["out"], out, rtol=1e-6, atol=1e-6)
