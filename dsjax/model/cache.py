"""The KV cache for generation, and attention of one new token over it.

Keys and values of every layer live in one preallocated pair of arrays `(layers, batch, max_len, kv_heads,
head_dim)` in the compute dtype, stacked like the scanned layer weights so the layer scan hands each layer its own
slice. K/V are stored once per kv head (never repeated per query group).

Rows are ragged: row b holds `lengths[b]` valid tokens at indices 0..lengths[b]-1 (prompts are right-padded, so a
token's cache index is its position and a row never sees its batch mates' padding). A decode step reads the cache
slices unchanged inside the scan and attends over them plus the step's own key/value; the new keys/values of all
layers are then written with one scatter outside the scan, in place when the cache is donated, so the big buffer is
neither copied per layer nor held twice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.model.config import ModelConfig
from dsjax.sharding import constrain

CACHE_AXES = ("layers", "batch", "seq", "act_kv_heads", None)


class KVCache(NamedTuple):
    k: jax.Array  # (layers, batch, max_len, kv_heads, head_dim)
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def from_prefill(cls, k: jax.Array, v: jax.Array, max_len: int) -> "KVCache":
        """A cache of `max_len` slots whose first positions hold the prompt's (layers, batch, seq, kv, hd) K/V."""
        pad = [(0, 0), (0, 0), (0, max_len - k.shape[2]), (0, 0), (0, 0)]
        return cls(constrain(jnp.pad(k, pad), CACHE_AXES), constrain(jnp.pad(v, pad), CACHE_AXES))

    def append(self, k_new: jax.Array, v_new: jax.Array, lengths: jax.Array) -> "KVCache":
        """Writes one token per row, (layers, batch, kv, hd), at index lengths[b]; out-of-range indices are dropped."""
        rows = jnp.arange(self.k.shape[1])
        k = self.k.at[:, rows, lengths].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[:, rows, lengths].set(v_new.astype(self.v.dtype), mode="drop")
        return KVCache(constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """Shapes and dtypes of a cache (for sizing memory before allocating)."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    leaf = jax.ShapeDtypeStruct(shape, cfg.compute_dtype)
    return KVCache(leaf, leaf)


def decode_attention(q, k_cache, v_cache, lengths, k_new, v_new) -> jax.Array:
    """Attention of one query per row over its `lengths[b]` cached keys and its own new key.

    q: (batch, 1, heads, head_dim); k_cache/v_cache: (batch, max_len, kv_heads, head_dim) of one layer;
    k_new/v_new: (batch, 1, kv_heads, head_dim). Queries are grouped (kv_heads, group) against the shared K/V head,
    scores and softmax in float32, as in the `xla` reference backend.
    """
    batch, _, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, kv_heads, group, head_dim)
    cached = jnp.einsum("bkgd,btkd->bkgt", q, k_cache, preferred_element_type=jnp.float32) * (head_dim**-0.5)
    valid = jnp.arange(max_len)[None, :] < lengths[:, None]
    cached = jnp.where(valid[:, None, None, :], cached, jnp.finfo(jnp.float32).min)
    own = jnp.einsum("bkgd,bkd->bkg", q, k_new[:, 0], preferred_element_type=jnp.float32) * (head_dim**-0.5)
    scores = jnp.concatenate([cached, own[..., None]], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgt,btkd->bkgd", probs[..., :max_len], v_cache, preferred_element_type=jnp.float32)
    out = out + probs[..., max_len:].astype(jnp.float32) * v_new[:, 0, :, None, :].astype(jnp.float32)
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
