"""The DeepSeek LLM decoder: embed -> scan over stacked pre-norm blocks -> final RMSNorm -> untied output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.model import params
from dsjax.model.block import Block
from dsjax.model.cache import KVCache
from dsjax.model.config import ModelConfig
from dsjax.model.linear import project
from dsjax.model.norm import RMSNorm
from dsjax.model.rope import rope_angles
from dsjax.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the outputs of the projection matmuls; recompute the cheap elementwise work and attention scores.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """`model(tokens, positions=None, segment_ids=None)` -> float32 logits (batch, seq, vocab).

    `positions` restart at 0 in each packed document and drive the rotary angles; `segment_ids` keep attention
    inside a document. Both default to a single unpacked sequence per row. `hidden_states` also takes `branch_ids`
    (evaluation: several continuations sharing one context in a row; `attention_ops` says how they mask).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        dtype = cfg.weight_dtype
        # The lookup table's vocab axis has its own name: a gather from a vocab-sharded table cannot be partitioned
        # efficiently, so by default it stays whole while `embed` is split (the output head's `vocab` is split).
        self.embed = params.normal(rngs, (cfg.vocab_size, cfg.d_model), ("embed_vocab", "embed"), cfg.init_std, dtype)
        self.layers = Block(cfg, rngs, layers=cfg.n_layers)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
        self.lm_head = params.normal(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, dtype)

    def hidden_states(self, tokens, positions=None, segment_ids=None, branch_ids=None) -> jax.Array:
        """Final-normed hidden states (batch, seq, d_model) in the compute dtype, before the output head."""
        cfg = self.config
        tokens, positions = _check_inputs(tokens, positions, segment_ids, branch_ids)
        # Gather the table whole before the lookup, as FSDP does for every weight: a lookup into an embed-split table
        # yields embed-split rows that XLA cannot efficiently turn into batch-split activations.
        table = constrain(self.embed[...].astype(cfg.compute_dtype), ("embed_vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0)
        x = constrain(x, ("batch", "act_seq", "act_embed"))  # split along the sequence between blocks (block.py)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)

        graphdef, stacked = nnx.split(self.layers)

        def layer(h, layer_params):
            return nnx.merge(graphdef, layer_params)(h, cos, sin, segment_ids, branch_ids), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, stacked)
        else:
            # The scan's backward writes each layer's saved activations into stacked (layers, ...) buffers and
            # slices them out again; on XLA:CPU that cost 5-10% of the 16M-125M train steps (README "CPU speed").
            for i in range(cfg.n_layers):
                x, _ = layer(x, jax.tree.map(lambda a, i=i: a[i], stacked))
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output head with float32 accumulation and result, whatever the compute dtype."""
        out = project(hidden, self.lm_head[...], out_dtype=jnp.float32)
        return constrain(out, ("batch", "seq", "act_vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions, segment_ids))

    # ------------------------------------------------------------------ generation: the KV-cache path (cache.py)
    #
    # Unlike training, prefill and decode loop over the layers in Python (compile time grows with depth): each layer
    # then reads its own weights and cache buffer. In a scan over stacked arrays, XLA:CPU copies every layer's weight
    # and cache slices out before the matmuls, on every decode step (README "Generation").

    def prefill(self, tokens, lengths, max_len: int, layers=None) -> tuple[jax.Array, KVCache]:
        """Runs right-padded prompts (batch, seq) through the attention backend and builds a `max_len`-slot cache.

        Row b's prompt is tokens[b, :lengths[b]]; padding after it is never attended to (causal), so its output
        does not depend on its batch mates. Returns float32 logits (batch, vocab) at each row's last prompt token.
        `layers`: per-layer weights from `unstack_layers` (else static slices of the stacked ones).
        """
        cfg = self.config
        tokens, positions = _check_inputs(tokens, None, None)
        x = self._embed(tokens)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        ks, vs = [], []
        for block in self._blocks(layers):
            x, k, v = block.prefill(x, cos, sin)
            ks.append(KVCache.layer_from_prefill(k, max_len))
            vs.append(KVCache.layer_from_prefill(v, max_len))
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        return self.logits(self.final_norm(last))[:, 0], KVCache(tuple(ks), tuple(vs))

    def decode(self, tokens, cache: KVCache, lengths, layers=None) -> tuple[jax.Array, KVCache]:
        """One token per row (batch,) at position lengths[b], after the row's lengths[b] cached tokens.

        Each layer writes the token's key/value into its cache buffer (in place when the cache is donated) and
        attends over it. Returns logits (batch, vocab) and the cache holding the new token (the caller advances
        `lengths`). `layers` as in `prefill`.
        """
        cfg = self.config
        x = self._embed(tokens[:, None])
        cos, sin = rope_angles(lengths[:, None], cfg.head_dim, cfg.rope_theta)
        ks, vs = [], []
        for block, k_cache, v_cache in zip(self._blocks(layers), cache.k, cache.v, strict=True):
            x, k_cache, v_cache = block.decode(x, cos, sin, k_cache, v_cache, lengths)
            ks.append(k_cache)
            vs.append(v_cache)
        return self.logits(self.final_norm(x))[:, 0], KVCache(tuple(ks), tuple(vs))

    def _blocks(self, layers=None) -> list[Block]:
        graphdef, stacked = nnx.split(self.layers)
        if layers is None:
            layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.config.n_layers)]
        return [nnx.merge(graphdef, state) for state in layers]

    def _embed(self, tokens):
        table = constrain(self.embed[...].astype(self.config.compute_dtype), ("embed_vocab", "act_embed"))
        return constrain(jnp.take(table, tokens, axis=0), ("batch", "seq", "act_embed"))


def _check_inputs(tokens, positions, segment_ids, branch_ids=None):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array of shape (batch, seq), got {tokens.dtype}{tokens.shape}.")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    for name, value in (("positions", positions), ("segment_ids", segment_ids), ("branch_ids", branch_ids)):
        if value is not None and tuple(value.shape) != tuple(tokens.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)} but tokens have shape {tuple(tokens.shape)}.")
    return tokens, positions


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, nnx.Rngs(params=seed))


def unstack_layers(model: Transformer) -> tuple:
    """Per-layer copies of the stacked layer weights (one nnx state per layer) for `prefill`/`decode(layers=...)`."""
    _, stacked = nnx.split(model.layers)
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(model.config.n_layers))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, nothing allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))


def param_count(model: Transformer) -> int:
    """Number of parameters (works on abstract models)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
