"""Tile sizes of the three kernels (forward, dK/dV, dQ), in sequence positions, and their per-platform defaults.

A tile of `block_q` query positions holds every query head that shares the tile's K/V head, so its score
matrix has `block_q * heads_per_tile` rows: grouped-query attention makes tiles taller, not more numerous.
Defaults aim at ~128 score rows on GPU (register-resident accumulators) and ~512 on TPU (MXU-sized, VMEM has
room). They are starting points, not tuned numbers: `experiments/bench_attention.py --sweep` tries others.
"""

from __future__ import annotations

import dataclasses

from dsjax.kernels.errors import UnsupportedError

# GPU: Triton tiles must be powers of two and matmul operands at least 16 wide.
GPU_MIN_BLOCK = 16
# TPU: query tiles are sublane-aligned (16 covers bf16 packing); key tiles fill the 128 lanes.
TPU_MIN_BLOCK_Q = 16
TPU_MIN_BLOCK_K = 128
# Mosaic GPU forward: one warpgroup's wgmma covers 64 query rows; key tiles of 64 fill the 128-byte swizzle.
# Its backward is the Triton one, so the dK/dV and dQ tiles follow the GPU rules.
MOSAIC_GPU_MIN_BLOCK = 64
MOSAIC_GPU_MAX_BLOCK_Q = 64  # the accumulator of one warpgroup: 64 rows


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tile sizes for the forward, the dK/dV and the dQ kernels (all powers of two)."""

    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int

    @classmethod
    def uniform(cls, block_q: int, block_k: int) -> BlockSizes:
        return cls(block_q, block_k, block_q, block_k, block_q, block_k)

    def replace(self, **changes) -> BlockSizes:
        return dataclasses.replace(self, **changes)

    @property
    def largest(self) -> int:
        return max(dataclasses.astuple(self))


def gpu_heads_per_tile(group: int) -> int:
    """Query heads per GPU tile: the largest power of two dividing the group, at most 8 (tile height).

    With 8 or fewer heads per group (DeepSeek 67B has 8) a tile covers the whole group, so K/V are read once
    per group and dK/dV are summed inside the kernel.
    """
    heads = 1
    while group % (heads * 2) == 0 and heads * 2 <= 8:
        heads *= 2
    return heads


def default_blocks(backend: str, group: int, head_dim: int) -> BlockSizes:
    if backend == "mosaic_gpu":
        return default_blocks("gpu", group, head_dim).replace(block_q=64, block_k=128)
    if backend == "gpu":
        heads = gpu_heads_per_tile(group)
        rows = lambda target: max(GPU_MIN_BLOCK, target // heads)
        block_k = 64 if head_dim > 64 else 128
        return BlockSizes(
            block_q=rows(128), block_k=block_k,
            block_q_dkv=rows(64), block_k_dkv=block_k,
            block_q_dq=rows(64), block_k_dq=block_k,
        )
    block_q = max(TPU_MIN_BLOCK_Q, 512 // _pow2_floor(group))
    return BlockSizes.uniform(block_q, 512)


def fit_blocks(blocks: BlockSizes, backend: str, seq_len: int) -> BlockSizes:
    """Shrinks tiles longer than the (power-of-two rounded) sequence, then checks the platform's rules."""
    cap = _pow2_ceil(seq_len)
    fitted = {}
    for field in dataclasses.fields(blocks):
        value = getattr(blocks, field.name)
        minimum = _min_block(backend, field.name)
        if value < minimum or value & (value - 1):
            raise UnsupportedError(
                f"{field.name}={value} must be a power of two of at least {minimum} for the {backend} kernel."
            )
        if backend == "mosaic_gpu" and field.name == "block_q" and value > MOSAIC_GPU_MAX_BLOCK_Q:
            raise UnsupportedError(
                f"block_q={value} is above {MOSAIC_GPU_MAX_BLOCK_Q}, the rows of one warpgroup, for the mosaic_gpu "
                "kernel."
            )
        fitted[field.name] = max(minimum, min(value, cap))
    return BlockSizes(**fitted)


def _min_block(backend: str, field: str) -> int:
    if backend == "mosaic_gpu":
        return MOSAIC_GPU_MIN_BLOCK if field in ("block_q", "block_k") else GPU_MIN_BLOCK
    if backend == "gpu":
        return GPU_MIN_BLOCK
    return TPU_MIN_BLOCK_Q if field.startswith("block_q") else TPU_MIN_BLOCK_K


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)
