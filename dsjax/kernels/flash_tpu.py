"""Flash attention for TPUs through Mosaic (Pallas TPU).

Mosaic tiles the last two dimensions of every block onto (sublane, lane) = (8, 128) vector registers, so
inputs are first transposed to heads-major: q to (batch, kv_heads, group, seq, head_dim), k and v to
(batch, kv_heads, seq, head_dim). One grid step owns the `group` query heads of one K/V head for `block_q`
positions, a (group * block_q, head_dim) matrix: K/V tiles are fetched once per group, and in the backward the
matmuls over those rows sum dK/dV over the group.

Unlike the GPU kernel, the reduction over tiles is a grid axis ("arbitrary": sequential on one core), with
running state in VMEM scratch; the Pallas pipeline double-buffers the HBM->VMEM copies. Tiles above the
causal diagonal are skipped with `pl.when`, and their index maps repeat the previous block index, so the
pipeline does not fetch them either. With segment ids, the tile ranges of `masking.segment_ranges` are
scalar-prefetched into SMEM and narrow the visited steps (and the index maps) the same way. Per-row
statistics (max, sum, log-sum-exp, delta) are kept replicated across the 128 lanes, the layout Mosaic handles
without relayouts.

Grids: forward and dQ (batch, kv_head, query tile, key tile); dK/dV (batch, kv_head, key tile, query tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsjax.kernels import masking
from dsjax.kernels.errors import UnsupportedError
from dsjax.kernels.matmul import NT, TN, dot
from dsjax.kernels.plan import Plan

LANES = 128
SUBLANES = 8
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _lanes(stat, width: int):
    """A lane-replicated (rows, 128) statistic widened or narrowed to (rows, width)."""
    if width <= LANES:
        return stat if width == LANES else stat[:, :width]
    return jnp.tile(stat, (1, width // LANES))


def _masked_scores(q, k, q0, k0, q_seg_ref, k_seg_ref, plan: Plan, group: int, position_mask: bool):
    """Scaled logits (group * bq, bk); the (bq, bk) mask is shared by the group's heads."""
    rows, bk = q.shape[0], k.shape[0]
    bq = rows // group
    s = dot(q, k, NT) * plan.scale
    q_seg = k_seg = None
    if q_seg_ref is not None:
        q_seg = _lanes(q_seg_ref[...], bk)
        k_seg = k_seg_ref[0:1, :]
    mask = masking.visible(
        masking.positions(q0, (bq, bk), 0), masking.positions(k0, (bq, bk), 1), q_seg, k_seg,
        causal=plan.causal, seq_len=plan.seq_len, position_mask=position_mask,
    )
    if mask is None:
        return s
    return jnp.where(mask[None], s.reshape(group, bq, bk), masking.MASK_VALUE).reshape(rows, bk)


def _on_tiles(index, ranges, step, segment_range):
    """Runs step(position_mask) when `index` lies in one of the ranges [(lo, hi, position_mask)], narrowed to
    `segment_range` (see `_segment_range`); indices in none of them are skipped tiles."""
    for lo, hi, position_mask in ranges:
        if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
            continue  # statically empty (e.g. no padded edge to mask)
        lo, hi = _narrow(lo, hi, segment_range)
        pl.when((index >= lo) & (index < hi))(functools.partial(step, position_mask))


def _segment_range(range_refs, b, t):
    """(lo, hi) of tile `t` of batch row `b` from the scalar-prefetched `masking.segment_ranges` arrays, or
    None without segment ids."""
    if range_refs[0] is None:
        return None
    lo_ref, hi_ref = range_refs
    return lo_ref[b, t], hi_ref[b, t]


def _narrow(lo, hi, segment_range):
    if segment_range is None:
        return lo, hi
    return jnp.maximum(lo, segment_range[0]), jnp.minimum(hi, segment_range[1])


def _clamp(index, lo, hi):
    """Index map value for a skipped step: the nearest visited tile of [lo, hi), so nothing new is fetched."""
    return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, 0))


def _pallas_call(kernel, ranges, *, grid, in_specs, out_specs, out_shape, scratch_shapes, plan, name):
    """pallas_call whose segment ranges (when given) are scalar-prefetched into SMEM: the kernel gets them as
    its first two refs and every index map as its last two arguments."""
    prefetch = () if ranges[0] is None else tuple(ranges)
    call = pl.pallas_call(
        kernel if prefetch else functools.partial(kernel, None, None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes,
        ),
        out_shape=out_shape,
        compiler_params=_SEMANTICS,
        interpret=plan.interpret,
        name=name,
    )
    return lambda *operands: call(*prefetch, *operands)


# ----------------------------------------------------------------------------------------------- forward


def _forward_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, plan
):
    group, bq, d = q_ref.shape
    bk, rows = plan.blocks.block_k, group * bq
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(position_mask):
        q = q_ref[...].reshape(rows, d)
        s = _masked_scores(q, k_ref[...], i * bq, j * bk, q_seg_ref, k_seg_ref, plan, group, position_mask)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - _lanes(m_new, bk))
        l_ref[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        m_ref[...] = m_new
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * _lanes(alpha, d) + dot(p.astype(v.dtype), v)

    segment_range = _segment_range((lo_ref, hi_ref), b, i)
    _on_tiles(j, [(0, unmasked_end, False), (unmasked_end, end, True)], step, segment_range)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] * _lanes(1.0 / l, d)).reshape(group, bq, d).astype(o_ref.dtype)
        lse_ref[...] = (m_ref[...] + jnp.log(l)).reshape(group, bq, LANES)


def _kv_tile_index(plan: Plan, block_q: int, block_k: int):
    """Index map for key-side tiles in query-major grids: outside the visited tiles, repeat the nearest visited
    one (no fetch)."""

    def nearest_visited(b, i, j, *range_refs):
        _, end = masking.kv_blocks(i, block_q=block_q, block_k=block_k, seq_len=plan.seq_len, causal=plan.causal)
        lo, hi = _narrow(0, end, _segment_range(range_refs or (None, None), b, i))
        return _clamp(j, lo, hi)

    return nearest_visited


def _segment_arrays(seg):
    """Query ids lane-broadcast (B, S, 128) and key ids sublane-broadcast (B, 8, S): tile-shaped blocks."""
    if seg is None:
        return None, None
    batch, seq = seg.shape
    return (
        jax.lax.broadcast_in_dim(seg, (batch, seq, LANES), (0, 1)),
        jax.lax.broadcast_in_dim(seg, (batch, SUBLANES, seq), (0, 2)),
    )


def _forward_call(qt, kt, vt, seg, plan: Plan):
    batch, kv_heads, group, seq, d = qt.shape
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    kv_index = _kv_tile_index(plan, bq, bk)
    q_seg, k_seg = _segment_arrays(seg)
    q_tile = pl.BlockSpec((None, None, group, bq, d), lambda b, h, i, j, *r: (b, h, 0, i, 0))
    kv_tile = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *r: (b, h, kv_index(b, i, j, *r), 0))
    return _pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        masking.segment_ranges(seg, block_rows=bq, block_cols=bk),
        grid=(batch, kv_heads, seq // bq, seq // bk),
        in_specs=[
            q_tile, kv_tile, kv_tile,
            None if seg is None else pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *r: (b, i, 0)),
            None if seg is None else pl.BlockSpec(
                (None, SUBLANES, bk), lambda b, h, i, j, *r: (b, 0, kv_index(b, i, j, *r))
            ),
        ],
        out_specs=[
            q_tile,
            pl.BlockSpec((None, None, group, bq, LANES), lambda b, h, i, j, *r: (b, h, 0, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(qt.shape, qt.dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, group, seq, LANES), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((group * bq, LANES), jnp.float32),
            pltpu.VMEM((group * bq, LANES), jnp.float32),
            pltpu.VMEM((group * bq, d), jnp.float32),
        ],
        plan=plan,
        name="dsjax_flash_fwd_tpu",
    )(qt, kt, vt, q_seg, k_seg)


# ---------------------------------------------------------------------------------------------- backward


def _dkdv_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    dk_acc, dv_acc, *, plan,
):
    group, bq, d = q_ref.shape
    bk, rows = plan.blocks.block_k_dkv, group * bq
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    start, masked_end, end = masking.q_blocks(j, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(position_mask):
        q = q_ref[...].reshape(rows, d)
        do = do_ref[...].reshape(rows, d)
        s = _masked_scores(q, k_ref[...], i * bq, j * bk, q_seg_ref, k_seg_ref, plan, group, position_mask)
        p = jnp.exp(s - _lanes(lse_ref[...].reshape(rows, LANES), bk))
        dv_acc[...] += dot(p.astype(do.dtype), do, TN)
        dp = dot(do, v_ref[...], NT)
        ds = p * (dp - _lanes(delta_ref[...].reshape(rows, LANES), bk))
        dk_acc[...] += dot(ds.astype(q.dtype), q, TN)

    _on_tiles(i, [(start, masked_end, True), (masked_end, end, False)], step, _segment_range((lo_ref, hi_ref), b, j))

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkdv_call(qt, kt, vt, seg, do_t, lse, delta, plan: Plan):
    batch, kv_heads, group, seq, d = qt.shape
    bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv

    def q_index(b, j, i, *range_refs):
        """Query-side tiles outside the visited range repeat the nearest visited one (no fetch)."""
        start, _, end = masking.q_blocks(j, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)
        return _clamp(i, *_narrow(start, end, _segment_range(range_refs or (None, None), b, j)))

    q_seg, k_seg = _segment_arrays(seg)
    rows_tile = pl.BlockSpec((None, None, group, bq, d), lambda b, h, j, i, *r: (b, h, 0, q_index(b, j, i, *r), 0))
    stats_tile = pl.BlockSpec(
        (None, None, group, bq, LANES), lambda b, h, j, i, *r: (b, h, 0, q_index(b, j, i, *r), 0)
    )
    kv_tile = pl.BlockSpec((None, None, bk, d), lambda b, h, j, i, *r: (b, h, j, 0))
    return _pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        masking.segment_ranges(seg, block_rows=bk, block_cols=bq),  # query tiles per key tile
        grid=(batch, kv_heads, seq // bk, seq // bq),
        in_specs=[
            rows_tile, kv_tile, kv_tile,
            None if seg is None else pl.BlockSpec(
                (None, bq, LANES), lambda b, h, j, i, *r: (b, q_index(b, j, i, *r), 0)
            ),
            None if seg is None else pl.BlockSpec((None, SUBLANES, bk), lambda b, h, j, i, *r: (b, 0, j)),
            rows_tile, stats_tile, stats_tile,
        ],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        plan=plan,
        name="dsjax_flash_dkdv_tpu",
    )(qt, kt, vt, q_seg, k_seg, do_t, lse, delta)


def _dq_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc, *, plan
):
    group, bq, d = q_ref.shape
    bk, rows = plan.blocks.block_k_dq, group * bq
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(position_mask):
        q = q_ref[...].reshape(rows, d)
        do = do_ref[...].reshape(rows, d)
        k = k_ref[...]
        s = _masked_scores(q, k, i * bq, j * bk, q_seg_ref, k_seg_ref, plan, group, position_mask)
        p = jnp.exp(s - _lanes(lse_ref[...].reshape(rows, LANES), bk))
        dp = dot(do, v_ref[...], NT)
        ds = p * (dp - _lanes(delta_ref[...].reshape(rows, LANES), bk))
        dq_acc[...] += dot(ds.astype(k.dtype), k)

    _on_tiles(j, [(0, unmasked_end, False), (unmasked_end, end, True)], step, _segment_range((lo_ref, hi_ref), b, i))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * plan.scale).reshape(group, bq, d).astype(dq_ref.dtype)


def _dq_call(qt, kt, vt, seg, do_t, lse, delta, plan: Plan):
    batch, kv_heads, group, seq, d = qt.shape
    bq, bk = plan.blocks.block_q_dq, plan.blocks.block_k_dq
    kv_index = _kv_tile_index(plan, bq, bk)
    q_seg, k_seg = _segment_arrays(seg)
    rows_tile = pl.BlockSpec((None, None, group, bq, d), lambda b, h, i, j, *r: (b, h, 0, i, 0))
    stats_tile = pl.BlockSpec((None, None, group, bq, LANES), lambda b, h, i, j, *r: (b, h, 0, i, 0))
    kv_tile = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *r: (b, h, kv_index(b, i, j, *r), 0))
    return _pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        masking.segment_ranges(seg, block_rows=bq, block_cols=bk),
        grid=(batch, kv_heads, seq // bq, seq // bk),
        in_specs=[
            rows_tile, kv_tile, kv_tile,
            None if seg is None else pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *r: (b, i, 0)),
            None if seg is None else pl.BlockSpec(
                (None, SUBLANES, bk), lambda b, h, i, j, *r: (b, 0, kv_index(b, i, j, *r))
            ),
            rows_tile, stats_tile, stats_tile,
        ],
        out_specs=rows_tile,
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        scratch_shapes=[pltpu.VMEM((group * bq, d), jnp.float32)],
        plan=plan,
        name="dsjax_flash_dq_tpu",
    )(qt, kt, vt, q_seg, k_seg, do_t, lse, delta)


# ------------------------------------------------------------------------------------------- entry points


def _heads_major(x, kv_heads: int):
    """(B, S, H, D) -> (B, kv_heads, H // kv_heads, S, D): query heads of one K/V head side by side."""
    batch, seq, heads, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, kv_heads, heads // kv_heads, seq, d)


def _seq_major(x):
    """Inverse of `_heads_major`."""
    batch, kv_heads, group, seq, d = x.shape
    return x.reshape(batch, kv_heads * group, seq, d).transpose(0, 2, 1, 3)


def forward(q, k, v, seg, plan: Plan):
    """(B, S, H, D) output and the residuals for `backward` (kept heads-major: no second transpose)."""
    d = q.shape[-1]
    if d > LANES and d % LANES:
        raise UnsupportedError(f"head_dim={d} must be at most {LANES} or a multiple of {LANES} for the tpu kernel.")
    kv_heads = k.shape[2]
    qt = _heads_major(q, kv_heads)
    kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))
    ot, lse = _forward_call(qt, kt, vt, seg, plan)
    return _seq_major(ot), (qt, kt, vt, seg, ot, lse)


def backward(plan: Plan, residuals, do):
    qt, kt, vt, seg, ot, lse = residuals
    do_t = _heads_major(do, kt.shape[1])
    # delta_i = rowsum(dO * O), lane-replicated like the other row statistics.
    delta = jnp.einsum("bhgsd,bhgsd->bhgs", ot.astype(jnp.float32), do_t.astype(jnp.float32))
    delta = jax.lax.broadcast_in_dim(delta, (*delta.shape, LANES), (0, 1, 2, 3))
    dkt, dvt = _dkdv_call(qt, kt, vt, seg, do_t, lse, delta, plan)
    dqt = _dq_call(qt, kt, vt, seg, do_t, lse, delta, plan)
    to_seq_major = lambda x: x.transpose(0, 2, 1, 3)
    return _seq_major(dqt), to_seq_major(dkt), to_seq_major(dvt)
