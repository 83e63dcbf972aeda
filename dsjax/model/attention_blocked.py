"""Causal attention in blocks of queries with its own backward: `model.attention=auto`'s backend on CPU.

The `xla` reference forms the float32 (batch, kv, group, S, S) scores, and autodiff keeps the probabilities of every
layer for the backward: on CPU, XLA then spends more of the train step transposing, masking and stacking those
S x S arrays than multiplying (issue 17, experiments/bench_train_cpu.py). Here:

- Queries go in blocks of `block` positions; a block sees only the keys up to its last position (causal), so the
  key blocks above the diagonal are never computed: about half the attention FLOPs and memory of a long sequence.
  Each block has its whole key range at once, so its softmax is exact (no running rescaling as in flash attention).
- The custom VJP keeps q, k, v, the output and the per-row log-sum-exp, and recomputes a block's probabilities in
  the backward, so nothing S x S outlives a block.
- Every product is a batched matmul over (batch, kv head) whose operands XLA reads as laid out: queries of a kv head's
  group are rows (position-major: row = position * group + g), so a block of positions is a contiguous slice of rows;
  the backward's transposed products take the transpose of the small (rows, head_dim) operand, never of the
  (rows, keys) probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 64  # query positions per block: our choice (its train step: experiments/bench_train_cpu.py)


def blocked_attention(q, k, v, segment_ids=None, *, causal: bool = True, block: int = BLOCK) -> jax.Array:
    """Same contract and numbers (up to summation order) as `attention_ops.xla_attention`, without branch_ids."""
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, k.shape[1]), jnp.int32)
    rows = lambda x: x.reshape(batch, seq_q, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = rows(q).reshape(batch, kv_heads, -1, head_dim)
    out = _attend(q_rows, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids, causal, block,
                  heads // kv_heads)
    out = out.reshape(batch, kv_heads, seq_q, heads // kv_heads, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, seq_q, heads, head_dim)


def _spans(seq_q: int, seq_k: int, causal: bool, block: int):
    """(first, last) query positions of each block and the number of keys it sees."""
    for lo in range(0, seq_q, block):
        hi = min(lo + block, seq_q)
        yield lo, hi, (seq_k - seq_q + hi) if causal else seq_k


def _mask(segment_ids, lo, hi, n_keys, group, seq_q, causal):
    """(batch, 1, (hi - lo) * group, n_keys): True where a row of the block may attend to a key."""
    seq_k = segment_ids.shape[1]
    q_seg = jnp.repeat(segment_ids[:, seq_k - seq_q + lo:seq_k - seq_q + hi], group, axis=1)
    mask = q_seg[:, :, None] == segment_ids[:, None, :n_keys]
    if causal:
        q_pos = jnp.repeat(jnp.arange(lo, hi) + seq_k - seq_q, group)
        mask = mask & (q_pos[:, None] >= jnp.arange(n_keys)[None, :])[None]
    return mask[:, None]


def _dot(a, b, contract_a: int, contract_b: int):
    """Batched over (batch, kv head), accumulating in float32."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)


def _scores(q_block, k_keys, mask):
    scores = _dot(q_block, k_keys, 3, 3)
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q_rows, k, v, segment_ids, causal, block, group):
    return _forward(q_rows, k, v, segment_ids, causal, block, group)[0]


def _forward(q_rows, k, v, segment_ids, causal, block, group):
    """q_rows (batch, kv, seq_q * group, d), k and v (batch, kv, seq_k, d) -> output like q_rows and the
    log-sum-exp of each row's scores (batch, kv, seq_q * group), float32."""
    head_dim = q_rows.shape[-1]
    seq_k = k.shape[2]
    seq_q = q_rows.shape[2] // group
    q_scaled = q_rows * jnp.asarray(head_dim**-0.5, q_rows.dtype)
    outs, lses = [], []
    for lo, hi, n_keys in _spans(seq_q, seq_k, causal, block):
        scores = _scores(q_scaled[:, :, lo * group:hi * group], k[:, :, :n_keys],
                         _mask(segment_ids, lo, hi, n_keys, group, seq_q, causal))
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = _dot(weights.astype(v.dtype), v[:, :, :n_keys], 3, 2) / total
        outs.append(out.astype(q_rows.dtype))
        lses.append((peak + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _attend_fwd(q_rows, k, v, segment_ids, causal, block, group):
    out, lse = _forward(q_rows, k, v, segment_ids, causal, block, group)
    return out, (q_rows, k, v, segment_ids, out, lse)


def _attend_bwd(causal, block, group, residuals, d_out):
    q_rows, k, v, segment_ids, out, lse = residuals
    head_dim = q_rows.shape[-1]
    seq_k = k.shape[2]
    seq_q = q_rows.shape[2] // group
    scale = head_dim**-0.5
    q_scaled = q_rows * jnp.asarray(scale, q_rows.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq, dk_t = [], jnp.zeros(k.shape[:2] + (head_dim, seq_k), jnp.float32)
    dv_t = jnp.zeros_like(dk_t)
    for lo, hi, n_keys in _spans(seq_q, seq_k, causal, block):
        r0, r1 = lo * group, hi * group
        q_block, do_block = q_scaled[:, :, r0:r1], d_out[:, :, r0:r1]
        mask = _mask(segment_ids, lo, hi, n_keys, group, seq_q, causal)
        probs = jnp.exp(_scores(q_block, k[:, :, :n_keys], mask) - lse[:, :, r0:r1, None])
        d_probs = _dot(do_block, v[:, :, :n_keys], 3, 3)
        d_scores = probs * (d_probs - delta[:, :, r0:r1, None])
        dq.append(_dot(d_scores.astype(k.dtype), k[:, :, :n_keys], 3, 2) * scale)
        pad = ((0, 0), (0, 0), (0, 0), (0, seq_k - n_keys))
        dv_t = dv_t + jnp.pad(_dot(do_block.transpose(0, 1, 3, 2), probs.astype(v.dtype), 3, 2), pad)
        dk_t = dk_t + jnp.pad(_dot(q_block.transpose(0, 1, 3, 2), d_scores.astype(q_rows.dtype), 3, 2), pad)
    dq = jnp.concatenate(dq, axis=2).astype(q_rows.dtype)
    return dq, dk_t.transpose(0, 1, 3, 2).astype(k.dtype), dv_t.transpose(0, 1, 3, 2).astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)
