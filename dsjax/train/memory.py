"""Preflight: estimate per-device memory from shapes and shardings alone, and refuse a run that cannot fit.

Counted exactly from the shardings: parameters, float32 gradients (the accumulator) and the two float32 Adam
moments. Estimated: activations kept for the backward pass of one micro-batch (by remat policy) and the float32
logits of one loss chunk with their gradient. Nothing is allocated, so the 67B on a laptop is refused in a second
instead of being OOM-killed after minutes.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from dsjax.model import ModelConfig

GiB = 2**30


def _shard_bytes(abstract_tree, shardings) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard_shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(cfg: ModelConfig, tokens_per_device: int, seq_len: int) -> int:
    """Rough activation memory of one micro-batch on one device, by remat policy, plus one loss chunk's logits."""
    act = np.dtype(cfg.compute_dtype).itemsize
    d, f = cfg.d_model, cfg.d_ff
    kv = cfg.n_kv_heads * cfg.head_dim
    scores = cfg.n_heads * seq_len * 4 * (2 if cfg.attention == "xla" else 0)  # xla keeps S x S scores and probs
    per_layer = {
        "none": (4 * d + 2 * kv + 3 * f) * act + scores,
        "save_dots": (2 * d + 2 * kv + 3 * f) * act,
        "full": d * act,
    }[cfg.remat]
    working_layer = (6 * d + 4 * f) * act + scores  # one layer's forward + backward in flight
    # float32 logits and their gradient, for one chunk of the sequence at a time (model.loss_chunk, train/loss.py)
    chunk = min(cfg.loss_chunk, seq_len) if cfg.loss_chunk else seq_len
    logits = tokens_per_device * chunk // seq_len * cfg.vocab_size * 4 * 2
    return tokens_per_device * (cfg.n_layers * per_layer + working_layer) + logits


def device_capacity(device=None) -> int | None:
    """Bytes one device can hold: the accelerator's limit, or this host's available RAM shared by its CPU devices."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // max(1, jax.local_device_count())


def estimate(cfg: ModelConfig, abstract_state, shardings, micro_batch_per_device: int, seq_len: int) -> dict:
    params = _shard_bytes(abstract_state["params"], shardings["params"])
    grads = params * 4 // max(1, np.dtype(cfg.weight_dtype).itemsize)
    opt = _shard_bytes(abstract_state["opt_state"], shardings["opt_state"])
    acts = activation_bytes(cfg, micro_batch_per_device * seq_len, seq_len)
    frozen = _shard_bytes(abstract_state["frozen"], shardings["frozen"]) if "frozen" in abstract_state else 0
    return {"params": params, "grads": grads, "opt_state": opt, "frozen": frozen, "activations": acts,
            "total": params + grads + opt + frozen + acts}


def check_fits(name: str, est: dict, n_devices: int, capacity: int | None, headroom: float = 0.9) -> str:
    """A one-line summary; raises MemoryError with what would fit when the estimate exceeds the device.

    Both the state (split by FSDP) and the activations (the batch split by data parallelism) shrink in proportion to
    the number of devices, so the devices needed is the total over devices divided by what one device holds.
    """
    summary = (f"about {est['total'] / GiB:,.2f} GiB per device (params {est['params'] / GiB:,.2f}, "
               f"grads {est['grads'] / GiB:,.2f}, optimizer {est['opt_state'] / GiB:,.2f}, "
               + (f"frozen {est['frozen'] / GiB:,.2f}, " if est.get("frozen") else "") +
               f"activations {est['activations'] / GiB:,.2f})")
    if capacity is None or est["total"] <= headroom * capacity:
        return "needs " + summary + (f" of {capacity / GiB:.1f} GiB" if capacity else "")
    needed = math.ceil(est["total"] * n_devices / (headroom * capacity))
    raise MemoryError(
        f"config {name} does not fit: it needs {summary}, but each of the {n_devices} {jax.devices()[0].platform} "
        f"devices has {capacity / GiB:.1f} GiB; it would fit on about {needed:,} such devices with the state and "
        "batch split over them (mesh.shape=(1, -1, 1)), or with fewer sequences per device (train.grad_accum_steps, "
        "model.remat=full)."
    )
