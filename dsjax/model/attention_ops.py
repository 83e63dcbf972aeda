"""Scaled dot-product attention backends behind `model.attention`.

All take q of shape (batch, seq, heads, head_dim) and k, v of shape (batch, seq, kv_heads, head_dim) with
heads a multiple of kv_heads (grouped-query attention), and return (batch, seq, heads, head_dim).
`segment_ids` (batch, seq) marks packed documents: a token attends only to earlier tokens of its own segment.
`branch_ids` (batch, seq), `xla` only, used by evaluation to score several continuations of one context in one row:
within a segment, branch 0 is a shared prefix and a token of branch b > 0 sees the prefix and its own branch only.

- `xla`: the reference. Einsum softmax attention; K/V are never repeated per query group: queries are reshaped
  to (kv_heads, group) and contracted against the shared K/V head.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs only.
- `pallas`: our flash-attention kernels (`dsjax.kernels`).
- `blocked`: causal attention in query blocks with its own backward, in plain XLA (`attention_blocked`); the
  fastest on CPU.
- `auto`: the fastest path the platform offers (`blocked` on CPU; `xla` wherever `branch_ids` are given).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax import sharding
from dsjax.errors import ConfigError
from dsjax.model.attention_blocked import blocked_attention


def attention_mask(seq_q: int, seq_k: int, segment_ids: jax.Array | None, causal: bool,
                   branch_ids: jax.Array | None = None) -> jax.Array | None:
    """Boolean (batch or 1, seq_q, seq_k) mask: True where a query may attend to a key.

    Causality is by index (queries are the last seq_q of the seq_k keys); packed documents are contiguous, so
    index order is document order (a segment's prefix comes before its branches).
    """
    mask = None
    if causal:
        q_idx = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)
        mask = (q_idx >= jnp.arange(seq_k)[None, :])[None]
    if segment_ids is not None:
        same = segment_ids[:, -seq_q:, None] == segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    if branch_ids is not None:
        key = branch_ids[:, None, :]
        visible = (key == 0) | (key == branch_ids[:, -seq_q:, None])
        mask = visible if mask is None else mask & visible
    return mask


def xla_attention(q, k, v, segment_ids=None, branch_ids=None, *, causal: bool = True) -> jax.Array:
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, seq_q, kv_heads, group, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    mask = attention_mask(seq_q, seq_k, segment_ids, causal, branch_ids)
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)


def cudnn_attention(q, k, v, segment_ids=None, *, causal: bool = True) -> jax.Array:
    if jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention='cudnn' needs an NVIDIA GPU with cuDNN, but this platform is "
            f"'{jax.default_backend()}'; use 'xla' or 'auto'."
        )
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")


def pallas_attention(q, k, v, segment_ids=None, *, causal: bool = True) -> jax.Array:
    """Our Pallas flash-attention kernels (`dsjax.kernels`): the Triton one on GPU, the Mosaic one on TPU.

    On other platforms the kernels only run interpreted (slow, for tests): set DSJAX_PALLAS_INTERPRET=1 (the
    platform's kernel, GPU's on CPU) or =gpu / =tpu to pick one.
    """
    # Imported here so that the other backends never load Pallas.
    from dsjax import kernels

    try:
        interpret, kernel = kernels.interpret_from_env()
        platform = jax.default_backend()
        if not interpret and platform not in kernels.KERNELS:
            raise ConfigError(
                f"model.attention='pallas' needs a GPU or TPU, but this platform is '{platform}'; use 'xla' or "
                f"'auto' (or set {kernels.INTERPRET_ENV}=1 to run the kernels in slow interpret mode)."
            )
        return kernels.flash_attention(q, k, v, segment_ids, causal=causal, interpret=interpret, backend=kernel)
    except kernels.UnsupportedError as error:
        raise ConfigError(f"model.attention='pallas' cannot run here: {error}") from error


def resolve_backend(name: str, branch_ids: bool = False) -> str:
    """Maps `auto` to a concrete backend for the current platform (and `xla` when `branch_ids` are needed).

    GPU keeps cuDNN until experiments/bench_attention.py shows our Pallas kernel at least as fast on an H100
    (kernels/README.md); TPU has no cuDNN, so it gets the Pallas kernel; CPU gets `blocked`: the 16M train step
    ran 1.09x torch eager with it, 0.79x with the XLA reference (experiments/bench_train_cpu.py, README "Training").
    """
    if name != "auto":
        return name
    if branch_ids:
        return "xla"
    return {"gpu": "cudnn", "tpu": "pallas"}.get(jax.default_backend(), "blocked")


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention, "pallas": pallas_attention, "blocked": blocked_attention}


def per_shard(fn, q, k):
    """Runs a kernel backend once per device on its block of the batch and of the heads.

    XLA partitions the einsum reference by itself, but a Pallas or cuDNN call is opaque to it: under a mesh it would
    gather q, k, v and compute every head of the whole batch on every device. Attention is independent per sequence
    and per head, so each device runs the kernel on its own batch rows and (when the `tensor` axis divides both head
    counts, keeping each query group with its K/V head) its own heads.
    """
    active = sharding.active_rules()
    if active is None:
        return fn
    mesh, rules = active
    batch = sharding.logical_to_spec(("batch",), rules, (q.shape[0],), mesh)[0]
    heads = sharding.logical_to_spec(("act_heads",), rules, (q.shape[2],), mesh)[0]
    kv_heads = sharding.logical_to_spec(("act_kv_heads",), rules, (k.shape[2],), mesh)[0]
    if heads != kv_heads:
        heads = None
    qkv = PartitionSpec(batch, None, heads, None)
    segments = PartitionSpec(batch, None)

    def call(q, k, v, segment_ids=None):
        specs = (qkv, qkv, qkv) + ((segments,) if segment_ids is not None else ())
        args = (q, k, v) + ((segment_ids,) if segment_ids is not None else ())
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)

    return call


def dot_product_attention(q, k, v, segment_ids=None, branch_ids=None, *, backend: str = "xla", causal: bool = True):
    name = resolve_backend(backend, branch_ids is not None)
    fn = functools.partial(BACKENDS[name], causal=causal)
    if branch_ids is not None:
        if name != "xla":
            raise ConfigError(f"branch_ids (shared-prefix scoring) need model.attention='xla', not {backend!r}.")
        return fn(q, k, v, segment_ids, branch_ids)
    if name in ("cudnn", "pallas"):
        fn = per_shard(fn, q, k)
    return fn(q, k, v, segment_ids)
