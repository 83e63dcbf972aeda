"""Grouped-query self-attention: q/k/v projections, rotary embeddings, a backend, the output projection."""

from __future__ import annotations

import jax
from flax import nnx

from dsjax.model import params
from dsjax.model.attention_ops import dot_product_attention
from dsjax.model.cache import KVCache, decode_attention
from dsjax.model.config import ModelConfig
from dsjax.model.linear import project
from dsjax.model.rope import apply_rope
from dsjax.sharding import constrain


class Attention(nnx.Module):
    """Projections are stored per head, (embed, heads, head_dim), so sharding can split heads by name.

    DeepSeek 7B has 32 kv heads (plain multi-head); 67B has 8 kv heads for 64 query heads (groups of 8).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int | None = None):
        lead, lead_axes = ((layers,), ("layers",)) if layers is not None else ((), ())
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        make = lambda shape, axes: params.normal(rngs, lead + shape, lead_axes + axes, cfg.init_std, cfg.weight_dtype)
        self.q_proj = make((d, h, hd), ("embed", "heads", "head_dim"))
        self.k_proj = make((d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = make((d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.o_proj = make((h, hd, d), ("heads", "head_dim", "embed"))
        self.backend = cfg.attention

    def __call__(self, x, cos, sin, segment_ids=None, branch_ids=None) -> jax.Array:
        return self.prefill(x, cos, sin, segment_ids, branch_ids)[0]

    def prefill(self, x, cos, sin, segment_ids=None, branch_ids=None):
        """The training forward, also returning the rotated keys and values a KV cache keeps (batch, seq, kv, hd)."""
        q, k, v = self._qkv(x, cos, sin)
        out = dot_product_attention(q, k, v, segment_ids, branch_ids, backend=self.backend, causal=True)
        return project(out, self.o_proj[...], 2), k, v

    def decode(self, x, cos, sin, k_cache, v_cache, lengths):
        """One new token per row (x: (batch, 1, d_model)) at index lengths[b] of this layer's cache buffers.

        Writes the token's key and value into the buffers (`KVCache.write`), attends over indices 0..lengths[b] and
        returns the output and the updated buffers.
        """
        q, k, v = self._qkv(x, cos, sin)
        out = decode_attention(q, k_cache, v_cache, lengths, k[:, 0], v[:, 0])
        k_cache = KVCache.write(k_cache, k[:, 0], lengths)
        v_cache = KVCache.write(v_cache, v[:, 0], lengths)
        return project(out, self.o_proj[...], 2), k_cache, v_cache

    def _qkv(self, x, cos, sin):
        q = project(x, self.q_proj[...])
        k = project(x, self.k_proj[...])
        v = project(x, self.v_proj[...])
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        return q, k, v
