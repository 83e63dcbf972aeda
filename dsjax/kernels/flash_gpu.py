"""Flash attention for GPUs through the Pallas Triton lowering (NVIDIA, including H100, and AMD).

Arrays keep the model's (batch, seq, heads, head_dim) layout: BlockSpecs cut strided tiles, so nothing is
transposed or copied on the way in. One program owns one tile of `block_q` query positions for
`heads_per_tile` query heads of the same K/V head (all of a group of up to 8), i.e. a
(block_q * heads_per_tile, head_dim) matrix of rows ordered (position, head). K/V tiles are read once for the
whole group and never repeated in memory.

Three kernels:
- forward: grid (query tile, batch, head tile); a loop over key tiles keeps the online softmax (running max m,
  running sum l, float32 accumulator) and writes the output and the log-sum-exp (base 2) for the backward.
- dK/dV: grid (key tile, batch, head tile); a loop over query tiles. The group's query rows all sit in one
  tile, so P^T dO and dS^T Q sum over the group inside the matmul (no atomics, no per-head copies).
- dQ: grid (query tile, batch, head tile); a loop over key tiles, like the forward.
Logits are scaled by scale * log2(e) so the softmax uses exp2 (one fast hardware instruction).
With segment ids each program also reads its own [lo, hi) tile range (`masking.segment_ranges`) and narrows
its loop to it, so packed documents skip the tiles between documents.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dsjax.kernels import masking
from dsjax.kernels.blocks import gpu_heads_per_tile
from dsjax.kernels.matmul import NT, TN, dot
from dsjax.kernels.plan import Plan

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Static sizes of one call; `head_dim` is padded to a power of two (Triton tiles must be)."""

    seq: int  # padded sequence length
    heads: int
    group: int  # query heads per K/V head
    heads_per_tile: int
    head_dim: int

    @property
    def tiles_per_group(self) -> int:
        return self.group // self.heads_per_tile

    def kv_head(self, head_tile):
        """K/V head read by a head tile (index maps run on traced scalars)."""
        return head_tile if self.tiles_per_group == 1 else lax.div(head_tile, self.tiles_per_group)


def _compiler_params(rows: int, head_dim: int, stages: int) -> pltriton.CompilerParams:
    """Eight warps once a tile's accumulator reaches 128 x 128 floats (64 KiB of registers), else four."""
    return pltriton.CompilerParams(num_warps=8 if rows * head_dim >= 128 * 128 else 4, num_stages=stages)


def _query_tile(rows_ref, start, size, heads, head_dim):
    """(size, heads, head_dim) tile of a (seq, heads, head_dim) ref as (size * heads, head_dim) rows."""
    return rows_ref[pl.ds(start, size), :, :].reshape(size * heads, head_dim)


def _query_segments(seg_ref, start, size, heads):
    """Segment id of every (position, head) row, as a column (size * heads, 1)."""
    seg = seg_ref[pl.ds(start, size)]
    return jnp.broadcast_to(seg[:, None], (size, heads)).reshape(size * heads, 1)


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, plan: Plan, position_mask: bool):
    """Masked logits in base 2: (q @ k.T) * scale * log2(e), masked entries at MASK_VALUE."""
    s = dot(q, k, NT) * (plan.scale * LOG2_E)
    mask = masking.visible(
        q_pos, k_pos, q_seg, k_seg, causal=plan.causal, seq_len=plan.seq_len, position_mask=position_mask
    )
    return s if mask is None else jnp.where(mask, s, masking.MASK_VALUE)


def _two_phase_loop(ranges, body, carry, lo_ref=None, hi_ref=None):
    """Runs `body(index, carry, position_mask)` over consecutive index ranges [(lo, hi, position_mask)],
    each narrowed to the program's segment range [lo_ref[0], hi_ref[0]) when given (`masking.segment_ranges`)."""
    for lo, hi, position_mask in ranges:
        if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
            continue
        if lo_ref is not None:
            lo, hi = jnp.maximum(lo, lo_ref[0]), jnp.minimum(hi, hi_ref[0])
        carry = lax.fori_loop(lo, hi, functools.partial(body, position_mask=position_mask), carry)
    return carry


def _range_spec(tile_index):
    """BlockSpec handing a program its own entry of a (batch, tiles) segment-range array."""
    return pl.BlockSpec((None, 1), lambda t, b, h: (b, tile_index(t)))


# ----------------------------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, o_ref, lse_ref, *, plan: Plan, shape: _Shape):
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    gb, d = shape.heads_per_tile, shape.head_dim
    rows = bq * gb
    i = shape.seq // bq - 1 - pl.program_id(0)  # longest causal rows first: less tail imbalance
    q0 = i * bq
    q = q_ref[...].reshape(rows, d)
    q_pos = masking.positions(q0, (rows, 1), 0, repeat=gb)
    q_seg = None if seg_ref is None else _query_segments(seg_ref, q0, bq, gb)

    def body(j, carry, position_mask):
        acc, m, l = carry
        k0 = pl.multiple_of(j * bk, bk)
        k_seg = None if seg_ref is None else seg_ref[pl.ds(k0, bk)][None, :]
        s = _scores(
            q, k_ref[pl.ds(k0, bk), :], q_pos, masking.positions(k0, (1, bk), 1), q_seg, k_seg, plan,
            position_mask,
        )
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[pl.ds(k0, bk), :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + p.sum(axis=1)

    unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)
    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = _two_phase_loop([(0, unmasked_end, False), (unmasked_end, end, True)], body, init, lo_ref, hi_ref)
    o_ref[...] = (acc * (1.0 / l)[:, None]).reshape(bq, gb, d).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)).reshape(bq, gb)


def _forward_call(q, k, v, seg, ranges, plan: Plan, shape: _Shape):
    batch = q.shape[0]
    bq, gb, d = plan.blocks.block_q, shape.heads_per_tile, shape.head_dim
    nq = shape.seq // bq
    q_tile = lambda i, b, h: (b, nq - 1 - i, h, 0)
    kv_all = lambda i, b, h: (b, 0, shape.kv_head(h), 0)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, shape=shape),
        grid=(nq, batch, shape.heads // gb),  # query tiles vary fastest: programs sharing K/V run together
        in_specs=[
            pl.BlockSpec((None, bq, gb, d), q_tile),
            pl.BlockSpec((None, shape.seq, None, d), kv_all),
            pl.BlockSpec((None, shape.seq, None, d), kv_all),
            None if seg is None else pl.BlockSpec((None, shape.seq), lambda i, b, h: (b, 0)),
            *[None if seg is None else _range_spec(lambda i: nq - 1 - i)] * 2,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, gb, d), q_tile),
            pl.BlockSpec((None, bq, gb), lambda i, b, h: (b, nq - 1 - i, h)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(q.shape[:3], jnp.float32),
        ],
        # Three K/V tiles in flight; two for 4-byte inputs (three need ~226 KiB of shared memory: H100's limit).
        compiler_params=_compiler_params(bq * gb, d, stages=3 if q.dtype.itemsize <= 2 else 2),
        interpret=plan.interpret,
        name="dsjax_flash_fwd_gpu",
    )(q, k, v, seg, *ranges)


# ---------------------------------------------------------------------------------------------- backward


def _dkdv_kernel(
    q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan, shape
):
    bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
    gb, d = shape.heads_per_tile, shape.head_dim
    rows = bq * gb
    j = pl.program_id(0)
    k0 = j * bk
    k, v = k_ref[...], v_ref[...]
    k_pos = masking.positions(k0, (1, bk), 1)
    k_seg = None if seg_ref is None else seg_ref[pl.ds(k0, bk)][None, :]

    def body(i, carry, position_mask):
        dk, dv = carry
        q0 = pl.multiple_of(i * bq, bq)
        q = _query_tile(q_ref, q0, bq, gb, d)
        do = _query_tile(do_ref, q0, bq, gb, d)
        q_pos = masking.positions(q0, (rows, 1), 0, repeat=gb)
        q_seg = None if seg_ref is None else _query_segments(seg_ref, q0, bq, gb)
        s = _scores(q, k, q_pos, k_pos, q_seg, k_seg, plan, position_mask)
        p = jnp.exp2(s - lse_ref[pl.ds(q0, bq), :].reshape(rows, 1))
        dv = dv + dot(p.astype(do.dtype), do, TN)
        dp = dot(do, v, NT)
        ds = p * (dp - delta_ref[pl.ds(q0, bq), :].reshape(rows, 1))
        dk = dk + dot(ds.astype(q.dtype), q, TN)
        return dk, dv

    start, masked_end, end = masking.q_blocks(j, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)
    init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    dk, dv = _two_phase_loop([(start, masked_end, True), (masked_end, end, False)], body, init, lo_ref, hi_ref)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_call(q, k, v, seg, ranges, do, lse, delta, plan: Plan, shape: _Shape):
    batch, kv_heads = q.shape[0], k.shape[2]
    bk, gb, d, s = plan.blocks.block_k_dkv, shape.heads_per_tile, shape.head_dim, shape.seq
    # Several head tiles per group (groups wider than 8) write float32 partials that are summed afterwards.
    partial_dtype = lambda x: x.dtype if shape.tiles_per_group == 1 else jnp.float32
    rows_all = pl.BlockSpec((None, s, gb, d), lambda j, b, h: (b, 0, h, 0))
    stats_all = pl.BlockSpec((None, s, gb), lambda j, b, h: (b, 0, h))
    kv_tile = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, shape.kv_head(h), 0))
    out_tile = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
    out_shape = (batch, s, kv_heads * shape.tiles_per_group, d)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan, shape=shape),
        grid=(s // bk, batch, shape.heads // gb),
        in_specs=[
            rows_all, kv_tile, kv_tile,
            None if seg is None else pl.BlockSpec((None, s), lambda j, b, h: (b, 0)),
            *[None if seg is None else _range_spec(lambda j: j)] * 2,
            rows_all, stats_all, stats_all,
        ],
        out_specs=[out_tile, out_tile],
        out_shape=[
            jax.ShapeDtypeStruct(out_shape, partial_dtype(k)),
            jax.ShapeDtypeStruct(out_shape, partial_dtype(v)),
        ],
        compiler_params=_compiler_params(bk, d, stages=2),
        interpret=plan.interpret,
        name="dsjax_flash_dkdv_gpu",
    )(q, k, v, seg, *ranges, do, lse, delta)
    if shape.tiles_per_group > 1:
        group_sum = lambda x, like: x.reshape(batch, s, kv_heads, shape.tiles_per_group, d).sum(3).astype(like.dtype)
        dk, dv = group_sum(dk, k), group_sum(dv, v)
    return dk, dv


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan, shape):
    bq, bk = plan.blocks.block_q_dq, plan.blocks.block_k_dq
    gb, d = shape.heads_per_tile, shape.head_dim
    rows = bq * gb
    i = shape.seq // bq - 1 - pl.program_id(0)
    q0 = i * bq
    q = q_ref[...].reshape(rows, d)
    do = do_ref[...].reshape(rows, d)
    lse = lse_ref[...].reshape(rows, 1)
    delta = delta_ref[...].reshape(rows, 1)
    q_pos = masking.positions(q0, (rows, 1), 0, repeat=gb)
    q_seg = None if seg_ref is None else _query_segments(seg_ref, q0, bq, gb)

    def body(j, dq, position_mask):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        k_seg = None if seg_ref is None else seg_ref[pl.ds(k0, bk)][None, :]
        s = _scores(q, k, q_pos, masking.positions(k0, (1, bk), 1), q_seg, k_seg, plan, position_mask)
        p = jnp.exp2(s - lse)
        dp = dot(do, v_ref[pl.ds(k0, bk), :], NT)
        ds = p * (dp - delta)
        return dq + dot(ds.astype(k.dtype), k)

    unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)
    init = jnp.zeros((rows, d), jnp.float32)
    dq = _two_phase_loop([(0, unmasked_end, False), (unmasked_end, end, True)], body, init, lo_ref, hi_ref)
    dq_ref[...] = (dq * plan.scale).reshape(bq, gb, d).astype(dq_ref.dtype)


def _dq_call(q, k, v, seg, ranges, do, lse, delta, plan: Plan, shape: _Shape):
    batch = q.shape[0]
    bq, gb, d, s = plan.blocks.block_q_dq, shape.heads_per_tile, shape.head_dim, shape.seq
    nq = s // bq
    q_tile = pl.BlockSpec((None, bq, gb, d), lambda i, b, h: (b, nq - 1 - i, h, 0))
    stats_tile = pl.BlockSpec((None, bq, gb), lambda i, b, h: (b, nq - 1 - i, h))
    kv_all = pl.BlockSpec((None, s, None, d), lambda i, b, h: (b, 0, shape.kv_head(h), 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, shape=shape),
        grid=(nq, batch, shape.heads // gb),
        in_specs=[
            q_tile, kv_all, kv_all,
            None if seg is None else pl.BlockSpec((None, s), lambda i, b, h: (b, 0)),
            *[None if seg is None else _range_spec(lambda i: nq - 1 - i)] * 2,
            q_tile, stats_tile, stats_tile,
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(bq * gb, d, stages=2),
        interpret=plan.interpret,
        name="dsjax_flash_dq_gpu",
    )(q, k, v, seg, *ranges, do, lse, delta)


# ------------------------------------------------------------------------------------------- entry points


def _pad_head_dim(x, head_dim: int):
    return x if x.shape[-1] == head_dim else jnp.pad(x, [(0, 0)] * 3 + [(0, head_dim - x.shape[-1])])


def _shape(q, k) -> _Shape:
    _, seq, heads, head_dim = q.shape
    group = heads // k.shape[2]
    return _Shape(seq, heads, group, gpu_heads_per_tile(group), 1 << max(4, (head_dim - 1).bit_length()))


def forward(q, k, v, seg, plan: Plan):
    """(B, S, H, D) output and the residuals for `backward`; S is already padded to the block sizes.

    Head dims that are not powers of two are zero-padded (zero columns change no dot product)."""
    shape = _shape(q, k)
    head_dim = q.shape[-1]
    q, k, v = (_pad_head_dim(x, shape.head_dim) for x in (q, k, v))
    ranges = masking.segment_ranges(seg, block_rows=plan.blocks.block_q, block_cols=plan.blocks.block_k)
    o, lse = _forward_call(q, k, v, seg, ranges, plan, shape)
    return o[..., :head_dim], (q, k, v, seg, o, lse)


def backward(plan: Plan, residuals, do):
    q, k, v, seg, o, lse = residuals
    shape = _shape(q, k)
    head_dim = do.shape[-1]
    do = _pad_head_dim(do, shape.head_dim)
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O): one cheap elementwise pass, left to XLA to fuse.
    delta = jnp.einsum("bshd,bshd->bsh", o.astype(jnp.float32), do.astype(jnp.float32))
    blocks = plan.blocks
    # dK/dV programs own key tiles: their ranges are of query tiles.
    dkdv_ranges = masking.segment_ranges(seg, block_rows=blocks.block_k_dkv, block_cols=blocks.block_q_dkv)
    dk, dv = _dkdv_call(q, k, v, seg, dkdv_ranges, do, lse, delta, plan, shape)
    dq_ranges = masking.segment_ranges(seg, block_rows=blocks.block_q_dq, block_cols=blocks.block_k_dq)
    dq = _dq_call(q, k, v, seg, dq_ranges, do, lse, delta, plan, shape)
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
