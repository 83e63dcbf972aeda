"""Greedy completions printed at the end of a run, so a newcomer sees what the model learned.

No KV cache: every new token re-runs the model over a fixed-length window (one compiled shape), which is plenty for
a few dozen tokens from the tiny model. Generation proper (KV cache, sampling) is its own module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_samples(model, tokenizer, prompts, max_new_tokens: int, window: int):
    """Every process calls this: the parameters are global arrays, so each step is a collective computation."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def next_token(params, tokens, length):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.argmax(logits[0, length - 1])

    results = []
    for prompt in prompts:
        ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
        prompt_len = len(ids)
        for _ in range(max_new_tokens):
            context = ids[-window:]
            tokens = np.full((1, window), tokenizer.pad_id, np.int32)
            tokens[0, : len(context)] = context
            token = int(next_token(params, jnp.asarray(tokens), len(context)))
            if token == tokenizer.eos_id:
                break
            ids.append(token)
        results.append((prompt, tokenizer.decode(ids[prompt_len:])))
    return results
