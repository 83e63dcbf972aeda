"""Prefill + a device-side decode loop over the KV cache, and the `generate` API on top of it.

Two jitted programs with static shapes: `prefill` runs the right-padded prompt batch through the model's attention
backend, builds the cache and samples the first token; `decode` is a `lax.while_loop` that appends one token per row
until every row has finished (eos or its token budget) or the step limit of the call is reached. Prompt lengths,
output budget and cache length are rounded up to buckets, so a new prompt length rarely compiles anything.

Stop strings need decoded text, which only the host has: with stop strings (or when streaming) the loop runs in
chunks and the host checks each row's text between chunks, marking rows done. Random draws are keyed by
`fold_in(seed, step)`, so a seed gives the same tokens however the loop is chunked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dsjax import sharding
from dsjax.errors import ConfigError
from dsjax.generate.sampling import SamplingParams, sample
from dsjax.model import transformer
from dsjax.model.cache import KVCache

MIN_BUCKET = 16
STOP_CHECK_STEPS = 16  # decode steps between host checks for stop strings


class DecodeState(NamedTuple):
    """Everything the decode loop carries; lives on the device between chunks."""

    cache: KVCache
    lengths: jax.Array  # (batch,) valid tokens in the cache = position of `token`
    token: jax.Array  # (batch,) the newest sampled token, not yet in the cache
    out: jax.Array  # (batch, out_len) generated ids, pad after a row finished
    n_out: jax.Array  # (batch,) tokens generated so far (eos included)
    budget: jax.Array  # (batch,) max_new_tokens per row (0 for rows that only pad the batch)
    done: jax.Array  # (batch,) bool
    seen: jax.Array  # (batch, vocab) bool ids so far, for the repetition penalty; (batch, 0) when it is off
    step: jax.Array  # () int32 lockstep decode step (= columns of `out` written)
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Static:
    """The compile-time facts of one generation program (hashable, a static jit argument)."""

    graphdef: nnx.GraphDef
    sampling: SamplingParams
    vocab_size: int  # the tokenizer's: ids at or above are never sampled
    eos_id: int
    pad_id: int
    cache_len: int
    out_len: int
    rules: tuple | None  # (mesh, rules) active when traced: constraints are baked into the program


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated ids, without eos; with stop strings, up to the token that completed the stop
    text: str  # decoded ids, cut exactly where the first stop string starts
    finish_reason: str  # "eos", "stop" or "length"


@dataclasses.dataclass(frozen=True)
class Generations:
    """What `generate` returns: one Completion per prompt, in order, with `texts` and `ids` at hand."""

    completions: list[Completion]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def ids(self) -> list[list[int]]:
        return [c.ids for c in self.completions]

    def __len__(self):
        return len(self.completions)

    def __getitem__(self, i) -> Completion:
        return self.completions[i]


def bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


# ------------------------------------------------------------------------------------------------ device programs


def _constrain_state(state: DecodeState) -> DecodeState:
    row = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return state._replace(
        lengths=row(state.lengths), token=row(state.token), out=row(state.out), n_out=row(state.n_out),
        budget=row(state.budget), done=row(state.done), seen=row(state.seen),
    )


def _mark_seen(seen, tokens, where):
    if seen.shape[-1] == 0:
        return seen
    rows = jnp.arange(seen.shape[0])[:, None] if tokens.ndim == 2 else jnp.arange(seen.shape[0])
    tokens = jnp.where(where, tokens, seen.shape[-1])  # out of range: dropped
    return seen.at[rows, tokens].set(True, mode="drop")


@functools.partial(jax.jit, static_argnames="static")
def _prefill(params, tokens, lengths, budget, key, static: Static) -> DecodeState:
    (stacked, rest), layers = params
    model = nnx.merge(static.graphdef, stacked, rest)
    batch, seq = tokens.shape
    tokens = sharding.constrain(tokens, ("batch", "seq"))
    logits, cache = model.prefill(tokens, lengths, static.cache_len, layers)
    track = static.sampling.repetition_penalty != 1
    seen = jnp.zeros((batch, logits.shape[-1] if track else 0), bool)
    seen = _mark_seen(seen, tokens, jnp.arange(seq)[None, :] < lengths[:, None])
    first = sample(logits, jax.random.fold_in(key, 0), seen if track else None, static.sampling, static.vocab_size)
    live = budget > 0
    first = jnp.where(live, first, static.pad_id)
    n_out = live.astype(jnp.int32)
    state = DecodeState(
        cache=cache,
        lengths=lengths,
        token=first,
        out=jnp.full((batch, static.out_len), static.pad_id, jnp.int32).at[:, 0].set(first),
        n_out=n_out,
        budget=budget,
        done=~live | (first == static.eos_id) | (n_out >= budget),
        seen=_mark_seen(seen, first, live),
        step=jnp.int32(1),
        key=key,
    )
    return _constrain_state(state)


def _decode_loop(params, state: DecodeState, limit, static: Static) -> DecodeState:
    """Decode steps until every row is done or `step` reaches `limit` (<= out_len)."""
    (stacked, rest), layers = params
    model = nnx.merge(static.graphdef, stacked, rest)
    track = static.sampling.repetition_penalty != 1

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = model.decode(s.token, s.cache, s.lengths, layers)
        lengths = jnp.where(s.done, s.lengths, s.lengths + 1)
        key = jax.random.fold_in(s.key, s.step)
        token = sample(logits, key, s.seen if track else None, static.sampling, static.vocab_size)
        token = jnp.where(s.done, static.pad_id, token)
        n_out = s.n_out + (~s.done).astype(jnp.int32)
        done = s.done | (token == static.eos_id) | (n_out >= s.budget)
        out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
        new = s._replace(cache=cache, lengths=lengths, token=token, out=out, n_out=n_out, done=done,
                         seen=_mark_seen(s.seen, token, ~s.done), step=s.step + 1)
        return _constrain_state(new)

    return jax.lax.while_loop(cond, body, state)


# XLA:CPU's default copy insertion copied every layer's cache buffers on each step of the loop (they are read by
# attention, then updated in place); its region analysis proves the in-place update safe. With `decode_attention`'s
# read-before-write, 110M at batch 1 went from 37 to 43 tokens/s (README "Generation"). Other backends compile with
# their defaults.
CPU_DECODE_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
_decode_programs = {
    "default": jax.jit(_decode_loop, static_argnames="static", donate_argnames="state"),
    "cpu": jax.jit(_decode_loop, static_argnames="static", donate_argnames="state",
                   compiler_options=CPU_DECODE_OPTIONS),
}


def _decode(params, state: DecodeState, limit, static: Static) -> DecodeState:
    program = "cpu" if jax.default_backend() == "cpu" else "default"
    return _decode_programs[program](params, state, limit, static=static)


# --------------------------------------------------------------------------------------------------- the host side


class Generator:
    """Generation for one model: `generator.run(...)` streams host snapshots, `generate(...)` collects them.

    Holds the split model so repeated calls reuse the compiled programs (the jit cache keys on `Static`).
    `unstack_layers` (default: on the CPU backend) keeps one copy of each layer's weights instead of the stacked
    arrays (the model's own are then no longer referenced by the generator): on XLA:CPU a layer's slice of a stacked
    weight is copied out before every matmul, which made decoding ~2-3x slower (README "Generation"). Elsewhere
    the static slices of the stacked weights feed the matmuls directly.
    """

    def __init__(self, model, tokenizer=None, *, vocab_size: int | None = None, eos_id: int | None = None,
                 unstack_layers: bool | None = None):
        self.graphdef, stacked, rest = nnx.split(model, nnx.PathContains("layers"), ...)
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        layers = None
        if unstack_layers:
            layers = transformer.unstack_layers(model)
            # The stacked weights stay in the graph with zero layers (never read), so the model merges as usual.
            stacked = jax.tree.map(lambda a: jnp.zeros((0,) + a.shape[1:], a.dtype), stacked)
        self.params = ((stacked, rest), layers)
        self.config = model.config
        self.tokenizer = tokenizer
        tok_vocab = tokenizer.vocab_size if tokenizer is not None else self.config.vocab_size
        self.vocab_size = min(vocab_size or tok_vocab, self.config.vocab_size)
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else -1)
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0

    # -- prompts

    def encode(self, prompts) -> list[list[int]]:
        """Strings get bos prepended and are encoded; lists of ids are taken as they are."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ConfigError(f"prompt {i} is text, but no tokenizer was given to encode it.")
                ids = [self.tokenizer.bos_id] + list(self.tokenizer.encode(prompt))
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise ConfigError(f"prompt {i} is empty (no token ids).")
            out.append(ids)
        return out

    def check_lengths(self, prompt_ids, max_new_tokens: int, truncate: str | None = None) -> list[list[int]]:
        """Refuses (or with truncate='left' shortens) prompts that leave no room for max_new_tokens."""
        context = self.config.max_seq_len
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
        if max_new_tokens >= context:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} is beyond the model's context of {context} tokens "
                "(the prompt needs at least one)."
            )
        if truncate not in (None, "none", "left"):
            raise ConfigError(f"truncate={truncate!r} is not one of none, left.")
        room = context - max_new_tokens
        out = []
        for i, ids in enumerate(prompt_ids):
            if len(ids) > room:
                if truncate != "left":
                    raise ConfigError(
                        f"prompt {i} is {len(ids)} tokens, more than the {room} that the model's context of "
                        f"{context} leaves beside max_new_tokens={max_new_tokens}; shorten it or pass --truncate=left."
                    )
                # Keep bos (what every training document starts with) and the prompt's end.
                has_bos = self.tokenizer is not None and ids[0] == self.tokenizer.bos_id
                ids = ids[:1] + ids[len(ids) - room + 1:] if has_bos else ids[len(ids) - room:]
            out.append(ids)
        return out

    # -- running

    def run(self, prompt_ids, *, max_new_tokens: int, sampling: SamplingParams, seed: int = 0,
            chunk: int | None = None, stop_check=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields (out, n_out, done) numpy snapshots after prefill and after every chunk of decode steps.

        prompt_ids must already fit (`check_lengths`). stop_check(row, ids) -> bool lets the host end a row.
        """
        rules = sharding.active_rules()
        n = len(prompt_ids)
        batch = self._padded_batch(n, rules)
        longest = max(len(p) for p in prompt_ids)
        context = self.config.max_seq_len
        seq = bucket(longest, context)
        out_len = bucket(max_new_tokens, context)
        cache_len = min(context, -(-(seq + out_len) // MIN_BUCKET) * MIN_BUCKET)
        static = Static(self.graphdef, sampling, self.vocab_size, self.eos_id, self.pad_id, cache_len, out_len,
                        rules)
        tokens = np.full((batch, seq), self.pad_id, np.int32)
        lengths = np.ones((batch,), np.int32)
        budget = np.zeros((batch,), np.int32)
        for i, ids in enumerate(prompt_ids):
            tokens[i, : len(ids)] = ids
            lengths[i] = len(ids)
            budget[i] = max_new_tokens
        args = [tokens, lengths, budget]
        if rules is not None:
            mesh, table = rules
            args = [jax.device_put(a, NamedSharding(mesh, sharding.logical_to_spec(
                ("batch", "seq")[: a.ndim], table, a.shape, mesh))) for a in args]
        state = _prefill(self.params, *args, jax.random.key(seed), static)
        step = 1
        while True:
            out, n_out, done = (np.asarray(x) for x in jax.device_get((state.out, state.n_out, state.done)))
            if stop_check is not None:
                hit = [r for r in range(n) if not done[r] and stop_check(r, out[r, : n_out[r]].tolist())]
                if hit:
                    done = done.copy()
                    done[hit] = True
                    state = state._replace(done=jax.device_put(done, state.done.sharding))
            yield out[:n], n_out[:n], done[:n]
            if done.all() or step >= max_new_tokens:
                return
            step = min(max_new_tokens, step + (chunk or max_new_tokens))
            state = _decode(self.params, state, jnp.int32(step), static)

    def _padded_batch(self, n: int, rules) -> int:
        """The batch rounded up to a multiple of its data-parallel split, so every device gets whole rows."""
        if rules is None:
            return n
        ways = sharding.data_parallel_size(*rules)
        return -(-n // ways) * ways

    def generate(self, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 stop: Sequence[str] = (), seed: int = 0, truncate: str | None = None) -> Generations:
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        if stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to decode the output.")
        prompt_ids = self.check_lengths(self.encode(prompts), max_new_tokens, truncate)
        check = (lambda row, ids: find_stop(self.tokenizer.decode(ids), stop) is not None) if stop else None
        for out, n_out, done in self.run(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                         chunk=STOP_CHECK_STEPS if stop else None, stop_check=check):
            pass
        return Generations([self._finish(p, out[r, : n_out[r]].tolist(), stop) for r, p in enumerate(prompt_ids)])

    def _finish(self, prompt_ids, ids, stop) -> Completion:
        if ids and ids[-1] == self.eos_id:
            ids, reason = ids[:-1], "eos"
        else:
            reason = "length"
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        if stop:
            at = find_stop(text, stop)
            if at is not None:
                ids = _ids_through(self.tokenizer, ids, at)
                text, reason = text[: at[0]], "stop"
        return Completion(list(prompt_ids), ids, text, reason)


def find_stop(text: str, stop: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in text, or None."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


def _ids_through(tokenizer, ids, at) -> list[int]:
    """The shortest prefix of ids whose text contains the stop string found at `at`."""
    for j in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:j])) >= at[1]:
            return ids[:j]
    return ids


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0, truncate: str | None = None) -> Generations:
    """Completes each prompt (a string, bos prepended; or a list of token ids) with the model's KV-cache decoder.

    Temperature 0 (the default) is greedy. Under `dsjax.sharding.use_rules(mesh, rules)` it runs sharded (batch
    over data x fsdp, heads over tensor), with the model's parameters placed on that mesh (`shard_model`).
    """
    return Generator(model, tokenizer).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed, truncate=truncate,
    )


def param_shardings(model, mesh, rules):
    """A pytree like `dsjax.checkpoint.params_dict(model)` of NamedShardings from the parameters' logical axes."""
    from dsjax.model import params as model_params

    return model_params.shardings(model, mesh, rules)


def shard_model(model, mesh, rules=sharding.DEFAULT_RULES):
    """Places the model's parameters on `mesh` by their logical axes (in place) and returns the model."""
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(state), param_shardings(model, mesh, rules))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model
