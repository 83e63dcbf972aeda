"""Flash-attention forward for Hopper GPUs through Pallas Mosaic GPU (TMA, mbarriers, wgmma).

The Pallas Triton backend is deprecated from jax 0.11 on; this is the Hopper path written for its successor.
Only the forward is a Mosaic GPU kernel: it writes the output and the base-2 log-sum-exp in exactly
`flash_gpu`'s residual format, so `backward` is `flash_gpu.backward` (the Triton dK/dV and dQ kernels).

One program (CTA) owns `block_q` query positions of ONE query head: a (block_q, head_dim) tile, one
warpgroup, wgmma M = 64 per instruction. Grid (query tile, batch, head), longest causal rows first. The
loop over key tiles keeps the online softmax (running max m, running sum l, float32 accumulator) in the
wgmma register layout:
- K/V tiles are TMA-copied into a ring of `stages` shared-memory slots, each with its own mbarrier; the copy
  of tile j + stages is issued as soon as tile j's P V has finished reading its slot, so up to `stages`
  tiles are in flight while the tensor cores work.
- S = Q K^T and O += P V are wgmma with float32 accumulators; P goes to the tensor cores from registers.
- Logits are scaled by scale * log2(e) so the softmax is exp2.
- GQA: a program reads the tiles of its K/V head (head // group) straight from the model layout; nothing is
  repeated in memory (the group's programs share the tiles through L2).
- Masks follow `masking`: key tiles above the causal diagonal are never visited, the element mask is applied
  only on tiles that straddle the diagonal or the padding edge, and segment ids narrow the loop to
  `masking.segment_ranges` and are compared element-wise on every visited tile.
Not done yet: a Mosaic GPU backward, warp specialisation (a TMA producer warpgroup and two consumer
warpgroups, as FlashAttention-3 does), and reading K/V once per GQA group. Interpreted (tests on CPU), the
two matmuls are dots rather than wgmma: see `_Ops`.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsjax.kernels import flash_gpu, masking
from dsjax.kernels.errors import UnsupportedError
from dsjax.kernels.plan import Plan

try:  # public from jax 0.11
    from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
except ImportError:  # jax 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

LOG2_E = math.log2(math.e)
_LOAD_TAKES_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128)  # smaller head dims are zero-padded to 64, 96 to 128
SMEM_BUDGET = 200 * 1024  # of H100's 227 KiB per block, leaving room for the compiler's own use
MAX_STAGES = 3


class _Ops:
    """The kernel's register-level operations, compiled (wgmma, explicit layouts) or interpreted.

    Register arrays live in the wgmma accumulator layout (`reduce`=None) or its row (`reduce`=1) or column
    (`reduce`=0) vector layout, so masks, statistics and accumulators combine without relayouts.
    Mosaic GPU's interpreter (jax 0.10 and 0.11) only runs wgmma on untransposed shared-memory operands, has no
    rule for `plgpu.load` or `pl.run_state` and, in 0.10, none for `layout_cast`. Interpreted, the two matmuls
    are therefore float32-accumulated dots of the shared-memory tiles (P rounded to the input dtype first, as
    wgmma takes it) and layouts are left out; the TMA pipeline, barriers, loop bounds and masks are the same.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret

    @staticmethod
    def _layout(reduce):
        return plgpu.Layout.WGMMA if reduce is None else plgpu.Layout.WGMMA.reduce(reduce)

    def full(self, shape, value, reduce=None):
        x = jnp.full(shape, value, jnp.float32)
        return x if self.interpret else plgpu.layout_cast(x, self._layout(reduce))

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self._layout(None))

    def load(self, ref, reduce):
        """The whole of a shared-memory vector."""
        if self.interpret:
            return ref[...]
        if _LOAD_TAKES_INDEX:  # jax 0.10; 0.11 deprecates the index argument
            return plgpu.load(ref, (), layout=self._layout(reduce))
        return plgpu.load(ref, layout=self._layout(reduce))

    def scores(self, q_smem, k_smem):
        """Q K^T in float32; K^T is a transposed view of the K tile (wgmma reads either major order)."""
        if self.interpret:
            contract_head_dim = (((1,), (1,)), ((), ()))
            return lax.dot_general(q_smem[...], k_smem[...], contract_head_dim, preferred_element_type=jnp.float32)

        def qk(s_ref):
            plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
            return s_ref[...]  # reading the accumulator waits for the wgmma

        return pl.run_scoped(qk, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]), jnp.float32))

    def accumulate(self, acc, p, v_smem):
        """acc + P V, P from registers; returns once the wgmma is done, so the V slot can be refilled."""
        if self.interpret:
            return acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem)

        return pl.run_state(pv)(plgpu.ACC.init(acc))  # accumulates in place; returning waits for the wgmma


def _stages(block_k: int, head_dim: int, block_q: int, itemsize: int) -> int:
    """K/V tiles in flight: as many as fit the shared memory beside the Q/O tile, 2 to MAX_STAGES."""
    per_stage = 2 * block_k * head_dim * itemsize + block_k * 4  # K, V and the keys' segment ids
    stages = min(MAX_STAGES, (SMEM_BUDGET - block_q * head_dim * itemsize) // per_stage)
    if stages < 2:
        raise UnsupportedError(
            f"block_k={block_k} with head_dim={head_dim} leaves no room for two K/V tiles in shared memory; "
            "use a smaller block_k."
        )
    return stages


def _forward_kernel(
    q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, o_ref, lse_ref,
    qo_smem, qseg_smem, k_smem, v_smem, kseg_smem, lse_smem, q_bar, k_bar, v_bar, seg_bar,
    *, plan: Plan, group: int, stages: int,
):
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    nq = plan.padded_len // bq
    i = nq - 1 - lax.axis_index("q")  # longest causal rows first: less tail imbalance
    b, h = lax.axis_index("b"), lax.axis_index("h")
    kv_head = lax.div(h, jnp.int32(group)) if group > 1 else h
    q0 = i * bq
    d = qo_smem.shape[-1]

    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qo_smem, q_bar.at[0])
    if seg_ref is not None:  # vectors reach the wgmma layouts from shared memory only
        plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(q0, bq)], qseg_smem, q_bar.at[1])

    unmasked_end, end = masking.kv_blocks(i, block_q=bq, block_k=bk, seq_len=plan.seq_len, causal=plan.causal)
    first = jnp.int32(0)
    if seg_ref is not None:  # the key tiles that can share a segment with this query tile
        first, end = jnp.maximum(0, lo_ref[b, i]), jnp.minimum(end, hi_ref[b, i])

    def fetch(j):
        """Starts the TMA copies of key tile j into its ring slot (its ring position counts from `first`)."""
        slot = lax.rem(j - first, stages)
        rows = (b, pl.ds(j * bk, bk), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])
        if seg_ref is not None:
            plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(j * bk, bk)], kseg_smem.at[slot], seg_bar.at[slot])

    for s in range(stages):  # fill the ring
        pl.when(first + s < end)(functools.partial(fetch, first + s))

    ops = _Ops(plan.interpret)
    plgpu.barrier_wait(q_bar.at[0])
    q_seg = None
    if seg_ref is not None:
        plgpu.barrier_wait(q_bar.at[1])
        q_seg = ops.load(qseg_smem, reduce=1)
        q_seg = lax.broadcast_in_dim(q_seg, (bq, bk), [0])

    def body(j, carry, position_mask):
        acc, m, l = carry
        slot = lax.rem(j - first, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s = ops.scores(qo_smem, k_smem.at[slot]) * (plan.scale * LOG2_E)
        k_seg = None
        if seg_ref is not None:
            plgpu.barrier_wait(seg_bar.at[slot])
            k_seg = lax.broadcast_in_dim(ops.load(kseg_smem.at[slot], reduce=0), (bq, bk), [1])
        k0 = j * bk
        mask = masking.visible(
            q0 + ops.iota((bq, bk), 0),
            k0 + ops.iota((bq, bk), 1),
            q_seg, k_seg, causal=plan.causal, seq_len=plan.seq_len, position_mask=position_mask,
        )
        if mask is not None:
            s = jnp.where(mask, s, masking.MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        acc = ops.accumulate(acc, p.astype(v_smem.dtype), v_smem.at[slot])

        @pl.when(j + stages < end)
        def _refill():
            # The slot's last readers are done: the wgmma (waited for above) and the segment-id loads, which
            # every thread must finish before one thread's TMA overwrites them (a warpgroup barrier + fence).
            plgpu.commit_smem()
            fetch(j + stages)

        return acc, m_new, l

    carry = (ops.full((bq, d), 0.0), ops.full((bq,), -jnp.inf, reduce=1), ops.full((bq,), 0.0, reduce=1))
    # Tiles [first, unmasked_end) are fully visible by position, [unmasked_end, end) need the position mask.
    split = jnp.clip(unmasked_end, first, jnp.maximum(first, end))
    carry = lax.fori_loop(first, split, functools.partial(body, position_mask=False), carry)
    acc, m, l = lax.fori_loop(split, end, functools.partial(body, position_mask=True), carry)

    qo_smem[...] = (acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])).astype(qo_smem.dtype)
    lse_smem[...] = m + jnp.log2(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


def _forward_call(q, k, v, seg, ranges, plan: Plan):
    batch, seq, heads, d = q.shape
    bq, bk = plan.blocks.block_q, plan.blocks.block_k
    dtype = q.dtype
    stages = _stages(bk, d, bq, dtype.itemsize)
    # 128-byte swizzle over (8, 64) tiles: the layout wgmma reads without bank conflicts (64 16-bit elements).
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_forward_kernel, plan=plan, group=heads // k.shape[2], stages=stages)
    with_segments = seg is not None

    def entry(*refs):
        if not with_segments:  # absent inputs become None refs, so one kernel body serves both
            refs = refs[:3] + (None, None, None) + refs[3:]
        kernel(*refs)

    operands = (q, k, v) + ((seg, *ranges) if with_segments else ())
    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((bq, d), dtype, transforms=transforms),  # Q, then O on the way out
            plgpu.SMEM((bq,), jnp.int32),  # the queries' segment ids
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, bk), jnp.int32),
            plgpu.SMEM((bq,), jnp.float32),
            plgpu.Barrier(num_barriers=2),  # Q, its segment ids
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        ],
        grid=(seq // bq, batch, heads),  # query tiles vary fastest: programs sharing K/V run together
        grid_names=("q", "b", "h"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=InterpretGPUParams() if plan.interpret else None,
        kernel_name="dsjax_flash_fwd_mosaic_gpu",
    )(*operands)
    # The log-sum-exp is written (batch, heads, seq), contiguous per tile for TMA; flash_gpu keeps it
    # (batch, seq, heads). One transpose of seq * heads floats.
    return o, jnp.swapaxes(lse, 1, 2)


def _padded_head_dim(head_dim: int) -> int:
    for size in HEAD_DIMS:
        if head_dim <= size:
            return size
    raise UnsupportedError(
        f"The mosaic_gpu flash-attention kernel takes head_dim up to {HEAD_DIMS[-1]}, not {head_dim}; "
        'use backend="gpu".'
    )


def forward(q, k, v, seg, plan: Plan):
    """(B, S, H, D) output and `flash_gpu`'s residuals (q, k, v, seg, o, lse); S is already padded.

    Head dims below 64 (or between 64 and 128) are zero-padded, as `flash_gpu` pads to a power of two, so the
    residuals hold the padded arrays it expects."""
    if q.dtype not in DTYPES:
        raise UnsupportedError(
            f"The mosaic_gpu flash-attention kernel runs bfloat16 or float16 (wgmma), not {q.dtype}; "
            'use backend="gpu" for it.'
        )
    head_dim = q.shape[-1]
    padded = _padded_head_dim(head_dim)
    if padded != head_dim:
        q, k, v = (jnp.pad(x, [(0, 0)] * 3 + [(0, padded - head_dim)]) for x in (q, k, v))
    blocks = plan.blocks
    ranges = masking.segment_ranges(seg, block_rows=blocks.block_q, block_cols=blocks.block_k)
    o, lse = _forward_call(q, k, v, seg, ranges, plan)
    return o[..., :head_dim], (q, k, v, seg, o, lse)


def backward(plan: Plan, residuals, do):
    """The Triton dK/dV and dQ kernels of `flash_gpu`, on the residuals `forward` wrote in its format."""
    return flash_gpu.backward(plan, residuals, do)
