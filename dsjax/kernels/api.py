"""`flash_attention`: checks the request, picks the kernel, pads the sequence, and ties forward and backward
together under a `custom_vjp` whose residual is the log-sum-exp (never the S x S probabilities)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from dsjax.kernels import flash_gpu, flash_mosaic_gpu, flash_tpu
from dsjax.kernels.blocks import BlockSizes, default_blocks, fit_blocks
from dsjax.kernels.errors import UnsupportedError
from dsjax.kernels.plan import Plan

KERNELS = {"gpu": flash_gpu, "tpu": flash_tpu, "mosaic_gpu": flash_mosaic_gpu}
# The platform each kernel runs compiled on (its own name unless listed).
KERNEL_PLATFORM = {"mosaic_gpu": "gpu"}
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
INTERPRET_ENV = "DSJAX_PALLAS_INTERPRET"


def interpret_from_env() -> tuple[bool, str | None]:
    """Reads DSJAX_PALLAS_INTERPRET: unset/0 -> compiled kernels; 1 -> interpret the platform's kernel (the GPU
    one on CPU); gpu, mosaic_gpu or tpu -> interpret that kernel. Interpret mode runs the kernels as plain XLA
    ops, slowly, on any platform: it is how tests check them on CPU."""
    value = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False, None
    if value in ("1", "true", "yes"):
        return True, None
    if value in KERNELS:
        return True, value
    raise UnsupportedError(f"{INTERPRET_ENV}={value!r} is not one of 0, 1, {', '.join(KERNELS)}.")


def select_kernel(backend: str | None, interpret: bool) -> str:
    """The kernel to run: the platform's own unless `backend` names one; interpreted, any kernel runs anywhere.

    On a GPU the default stays "gpu" (Pallas Triton, any GPU and dtype); "mosaic_gpu" (Hopper only, 16-bit
    inputs) must be asked for."""
    platform = jax.default_backend()
    if backend is None:
        if platform in KERNELS:
            return platform
        if interpret:
            return "gpu"
        raise UnsupportedError(
            f"Pallas flash attention needs a GPU or TPU, but this platform is '{platform}' "
            "(pass interpret=True to emulate the kernels on CPU)."
        )
    if backend not in KERNELS:
        raise UnsupportedError(f"backend={backend!r} is not one of {', '.join(KERNELS)}.")
    if not interpret and KERNEL_PLATFORM.get(backend, backend) != platform:
        raise UnsupportedError(
            f"The {backend} flash-attention kernel cannot run on platform '{platform}' (only interpreted)."
        )
    return backend


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """Softmax attention, memory O(seq), differentiable in q, k and v.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim) with heads a multiple of kv_heads;
    segment_ids: optional (batch, seq) ints, a token attends only to tokens of its own segment. Scale is
    head_dim ** -0.5, as in the `xla` reference. `block_q`/`block_k` set every kernel's tiles (in positions),
    overriding `block_sizes`, which sets them kernel by kernel; by default each platform picks its own
    (`dsjax.kernels.blocks`). `backend` is "gpu" (Pallas Triton), "mosaic_gpu" (Pallas Mosaic GPU forward for
    Hopper, bfloat16/float16, with the Triton backward) or "tpu" (Mosaic); None means this platform's.
    `interpret=True` runs the kernel as XLA ops on any platform (tests, CPU).
    """
    kernel = select_kernel(backend, interpret)
    _check_inputs(q, k, v, segment_ids)
    _, seq, heads, head_dim = q.shape
    group = heads // k.shape[2]
    blocks = block_sizes or default_blocks(kernel, group, head_dim)
    if block_q is not None or block_k is not None:
        blocks = BlockSizes.uniform(block_q or blocks.block_q, block_k or blocks.block_k)
    blocks = fit_blocks(blocks, kernel, seq)
    padded = -(-seq // blocks.largest) * blocks.largest
    plan = Plan(kernel, causal, seq, padded, blocks, float(head_dim) ** -0.5, interpret)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention(q, k, v, segment_ids, plan)


def _check_inputs(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise UnsupportedError(
            f"flash attention wants q (batch, seq, heads, head_dim) and k, v of one shape (batch, seq, kv_heads, "
            f"head_dim); got q{q.shape}, k{k.shape}, v{v.shape}."
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise UnsupportedError(
            f"flash attention is self-attention: q{q.shape} and k{k.shape} must share batch, seq and head_dim."
        )
    if q.shape[2] % k.shape[2]:
        raise UnsupportedError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise UnsupportedError(
            f"flash attention takes q, k, v of one dtype among float32, bfloat16, float16; got {q.dtype}, "
            f"{k.dtype}, {v.dtype}."
        )
    if q.shape[3] > 256:
        raise UnsupportedError(f"head_dim={q.shape[3]} is above the kernels' limit of 256.")
    if segment_ids is not None and (
        tuple(segment_ids.shape) != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise UnsupportedError(
            f"segment_ids must be integers of shape {q.shape[:2]}, got {segment_ids.dtype}{tuple(segment_ids.shape)}."
        )


def _pad_seq(x, padded: int, mode="constant"):
    if x is None or x.shape[1] == padded:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, padded - x.shape[1])
    return jnp.pad(x, widths, mode=mode)


def _forward(q, k, v, segment_ids, plan: Plan):
    q, k, v = (_pad_seq(x, plan.padded_len) for x in (q, k, v))
    # Padded tokens repeat the last real id: position masks already keep them from real queries, and ids that
    # never decrease stay so, which keeps `masking.segment_ranges` tight.
    segment_ids = _pad_seq(segment_ids, plan.padded_len, mode="edge")
    out, residuals = KERNELS[plan.backend].forward(q, k, v, segment_ids, plan)
    return out[:, : plan.seq_len], residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, plan: Plan):
    return _forward(q, k, v, segment_ids, plan)[0]


def _attention_fwd(q, k, v, segment_ids, plan: Plan):
    return _forward(q, k, v, segment_ids, plan)


def _attention_bwd(plan: Plan, residuals, do):
    # Padded query rows get a zero output gradient, so they add nothing to dK and dV.
    dq, dk, dv = KERNELS[plan.backend].backward(plan, residuals, _pad_seq(do, plan.padded_len))
    unpad = lambda x: x[:, : plan.seq_len]
    return unpad(dq), unpad(dk), unpad(dv), None


_attention.defvjp(_attention_fwd, _attention_bwd)
