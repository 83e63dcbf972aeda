"""Which (query, key) pairs may attend: per element inside a tile, and per tile for skipping.

Shared by the GPU and TPU kernels so both visit, mask and skip exactly the same tiles. Sequences are padded
to a multiple of the block sizes (`dsjax.kernels.api`); `seq_len` below is the real, unpadded length.

Rules:
- causal: query position >= key position. Padded keys sit after every real query, so causality alone keeps
  them out of real rows.
- not causal: padded keys (position >= seq_len) are masked explicitly.
- segments: query and key must carry the same segment id (packed documents never see each other).

Tiles are visited in three kinds: skipped (fully masked by position), masked (straddle the causal diagonal or
the padding edge: need the element mask) and unmasked (fully visible: no mask arithmetic at all, which is
most tiles for long sequences). Segment masks cannot be decided per tile from static data, so when segment ids
are given every visited tile compares them; `segment_ranges` additionally narrows, from the ids at run time,
the tiles visited to those that can share a segment (packed short documents skip most of the causal triangle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, so a row whose every key is masked yields exp(0)=1 weights rather than NaN (inf - inf); such rows
# only occur for padding. Scaled by 0.7 so adding a few logits cannot overflow to -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _div(a, b):
    """Floor division for non-negative ints, Python or traced (`lax.div` lowers in Triton and Mosaic alike)."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(a, jnp.asarray(b, jnp.int32))


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _where(condition, a, b):
    if isinstance(condition, bool):
        return a if condition else b
    # Explicit int32: the Triton lowering gives Python-int operands of a select the type i1.
    return jnp.where(condition, jnp.int32(a), jnp.int32(b))


def visible(q_pos, k_pos, q_seg, k_seg, *, causal: bool, seq_len: int, position_mask: bool):
    """Boolean mask, broadcast from the arguments' shapes: True where the query may attend to the key.

    `position_mask` is False for tiles known to be fully visible by position; then only segments are compared.
    Returns None when nothing needs masking, so callers skip the `where` entirely.
    """
    mask = None
    if position_mask:
        mask = q_pos >= k_pos if causal else k_pos < seq_len
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    return mask


def kv_blocks(i, *, block_q: int, block_k: int, seq_len: int, causal: bool):
    """Key tiles visited by query tile `i`: [0, unmasked_end) need no position mask, [unmasked_end, end) do.

    Key tiles made only of padding are never visited; with causal masking, tiles above the diagonal are not.
    """
    end = -(-seq_len // block_k)
    if causal:
        # Last visible key of the tile is its last query, (i + 1) * block_q - 1.
        end = _min(end, _div((i + 1) * block_q + block_k - 1, block_k))
        # A key tile is fully visible if its last key is at or before the tile's first query, i * block_q.
        unmasked_end = _min(_div(i * block_q + 1, block_k), end)
    else:
        unmasked_end = seq_len // block_k
    return unmasked_end, end


def q_blocks(j, *, block_q: int, block_k: int, seq_len: int, causal: bool):
    """Query tiles visited for key tile `j` (dK/dV): [start, masked_end) need the position mask, then
    [masked_end, end) do not.

    Query tiles made only of padding carry zero output gradients and are skipped. Without causality no
    position mask is needed here: padded keys only produce dK/dV rows that are sliced away, so an empty range
    is returned for a key tile made only of padding.
    """
    # Key tiles made only of padding are skipped too: their dK/dV rows are sliced away.
    end = _where(j * block_k < seq_len, -(-seq_len // block_q), 0)
    if not causal:
        return 0, 0, end
    start = _min(_div(j * block_k, block_q), end)  # first tile holding a query at or after the tile's first key
    # Fully visible once the tile's first query is at or after the tile's last key, (j + 1) * block_k - 1.
    masked_end = _max(start, _min(_div((j + 1) * block_k - 1 + block_q - 1, block_q), end))
    return start, masked_end, end


def positions(start, shape, axis: int, repeat: int = 1) -> jax.Array:
    """int32 positions start + index // repeat along `axis` of an iota of `shape` (repeat > 1 when each
    position owns `repeat` consecutive rows, e.g. the query heads of one GQA group)."""
    idx = lax.broadcasted_iota(jnp.int32, shape, axis)
    if repeat > 1:
        idx = lax.div(idx, jnp.int32(repeat))
    return start + idx


def _tile_min_max(segment_ids, block: int):
    tiles = segment_ids.reshape(segment_ids.shape[0], -1, block)
    return tiles.min(axis=2), tiles.max(axis=2)


def segment_ranges(segment_ids, *, block_rows: int, block_cols: int):
    """For every tile of `block_rows` positions, the tiles [lo, hi) of `block_cols` positions that can hold a
    position of the same segment: (batch, n_row_tiles) int32 each.

    Tiles whose id ranges [min, max] do not overlap share no id, so every pair between them is masked and the
    tile is skipped exactly. Correct for any ids; tight when ids never decrease along the sequence, as packing
    makes them (then a query tile visits only the key tiles of its own documents). Called with query tiles as
    rows for the forward and dQ kernels, with key tiles as rows for dK/dV. Cost: one (tiles x tiles) comparison
    per batch row in XLA, e.g. 256 x 64 at 4096 tokens. Without segment ids: (None, None).
    """
    if segment_ids is None:
        return None, None
    row_min, row_max = _tile_min_max(segment_ids, block_rows)
    col_min, col_max = _tile_min_max(segment_ids, block_cols)
    overlap = (row_min[:, :, None] <= col_max[:, None, :]) & (col_min[:, None, :] <= row_max[:, :, None])
    n_cols = overlap.shape[2]
    # Every tile overlaps the tile(s) holding its own positions, so neither argmax meets an all-False row.
    lo = jnp.argmax(overlap, axis=2)
    hi = n_cols - jnp.argmax(overlap[:, :, ::-1], axis=2)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)
