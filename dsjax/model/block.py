"""One pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)).

`Block(cfg, rngs, layers=n)` creates the weights of n layers stacked on a leading `layers` axis; the transformer
scans over that axis, handing `__call__` one layer's slice at a time. Compile time is then flat in depth.
`prefill` and `decode` are the same layer for generation with a KV cache (`dsjax.model.cache`).
"""

from __future__ import annotations

import jax
from flax import nnx

from dsjax.model.attention import Attention
from dsjax.model.config import ModelConfig
from dsjax.model.mlp import MLP
from dsjax.model.norm import RMSNorm
from dsjax.sharding import constrain


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int | None = None):
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype, layers)
        self.attn = Attention(cfg, rngs, layers)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype, layers)
        self.mlp = MLP(cfg, rngs, layers)

    def __call__(self, x: jax.Array, cos, sin, segment_ids=None, branch_ids=None) -> jax.Array:
        # Sequence parallelism: the residual stream and the norms are split along the sequence (`act_seq`); each norm's
        # output is gathered whole for attention and the MLP, whose outputs are reduce-scattered back into the split.
        whole = lambda y: constrain(y, ("batch", "seq", "act_embed"))
        h = x + self.attn(whole(self.input_norm(x)), cos, sin, segment_ids, branch_ids)
        h = constrain(h, ("batch", "act_seq", "act_embed"))
        out = h + self.mlp(whole(self.post_attn_norm(h)))
        return constrain(out, ("batch", "act_seq", "act_embed"))

    def prefill(self, x: jax.Array, cos, sin):
        """The layer on a right-padded prompt batch; also returns its keys and values for the cache."""
        attn, k, v = self.attn.prefill(self.input_norm(x), cos, sin)
        return self._finish(x, attn), k, v

    def decode(self, x: jax.Array, cos, sin, k_cache, v_cache, lengths):
        """The layer on one new token per row with this layer's cache buffers; returns them updated."""
        attn, k, v = self.attn.decode(self.input_norm(x), cos, sin, k_cache, v_cache, lengths)
        return self._finish(x, attn), k, v

    def _finish(self, x, attn):
        h = constrain(x + attn, ("batch", "seq", "act_embed"))
        return constrain(h + self.mlp(self.post_attn_norm(h)), ("batch", "seq", "act_embed"))
