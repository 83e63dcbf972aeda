"""The KV cache for generation, and attention of one new token over it.

Keys and values live in one preallocated buffer per layer, `(batch, kv_heads, max_len, head_dim)` in the compute
dtype, with the logical axes `("batch", "act_kv_heads", "seq", None)` so it shards like the activations (batch over
data x fsdp, kv heads over tensor). K/V are stored once per kv head (never repeated per query group).

Why this layout (measured on XLA:CPU, see README "Generation"): each layer's cache is its own buffer, not a slice of
a stacked `(layers, ...)` array, because a slice of a stacked array that feeds a matmul is copied out every layer
and step on CPU (a scan over stacked K/V copied the whole cache twice per step). `kv_heads` before `max_len` makes
`(batch, kv_heads)` the leading batch dims of both attention products, so neither needs a transposed copy.

Rows are ragged: row b holds `lengths[b]` valid tokens at indices 0..lengths[b]-1 (prompts are right-padded, so a
token's cache index is its position and a row never sees its batch mates' padding). A decode step writes each
layer's new key/value at index lengths[b] (in place: the buffers are carried by the decode loop and donated) and
then attends over indices 0..lengths[b].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.model.config import ModelConfig
from dsjax.sharding import constrain

CACHE_AXES = ("batch", "act_kv_heads", "seq", None)


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # one (batch, kv_heads, max_len, head_dim) buffer per layer
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def layer_from_prefill(x: jax.Array, max_len: int) -> jax.Array:
        """One layer's `max_len`-slot buffer whose first positions hold the prompt's (batch, seq, kv, hd) K or V."""
        x = jnp.swapaxes(x, 1, 2)
        return constrain(jnp.pad(x, [(0, 0), (0, 0), (0, max_len - x.shape[2]), (0, 0)]), CACHE_AXES)

    @staticmethod
    def write(buffer: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
        """Writes one token per row, (batch, kv, hd), at index lengths[b] of one layer's buffer (dropped if out of
        range)."""
        rows = jnp.arange(buffer.shape[0])
        return constrain(buffer.at[rows, :, lengths].set(new.astype(buffer.dtype), mode="drop"), CACHE_AXES)


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """Shapes and dtypes of a cache (for sizing memory before allocating)."""
    leaf = jax.ShapeDtypeStruct((batch, cfg.n_kv_heads, max_len, cfg.head_dim), cfg.compute_dtype)
    return KVCache((leaf,) * cfg.n_layers, (leaf,) * cfg.n_layers)


def decode_attention(q, k_cache, v_cache, lengths, k_new, v_new) -> jax.Array:
    """Attention of one query per row over its cached keys 0..lengths[b]-1 and its own new key/value.

    q: (batch, 1, heads, head_dim); k_cache/v_cache: (batch, kv_heads, max_len, head_dim) of one layer, not yet
    holding the new token; k_new/v_new: (batch, kv_heads, head_dim). The new token is scored apart so the buffers are
    only read here and written afterwards: read after the write, XLA:CPU duplicated the write into each reader and
    copied every layer's buffers several times per step. Queries are grouped (kv_heads, group) against the shared
    K/V head; scores and softmax in float32, as in the `xla` reference backend.
    """
    batch, _, heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    f32 = jnp.float32
    scale = head_dim**-0.5
    scores = jnp.einsum("bkgd,bktd->bkgt", q, k_cache, preferred_element_type=f32) * scale
    valid = jnp.arange(max_len)[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(f32).min)
    own = jnp.einsum("bkgd,bkd->bkg", q, k_new, preferred_element_type=f32)[..., None] * scale
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), own)
    weights, own_weight = jnp.exp(scores - top), jnp.exp(own - top)
    total = jnp.sum(weights, axis=-1, keepdims=True) + own_weight
    out = jnp.einsum("bkgt,bktd->bkgd", weights.astype(v_cache.dtype), v_cache, preferred_element_type=f32)
    out = (out + own_weight * v_new[:, :, None, :].astype(f32)) / total
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
