"""Attention speed: our Pallas flash attention against jax.nn.dot_product_attention (XLA, and cuDNN on GPU).

    python experiments/bench_attention.py            # the tables for kernels/README.md (run on the GPU/TPU)
    python experiments/bench_attention.py --sweep    # also time other tile sizes for our kernel
    python experiments/bench_attention.py --smoke    # tiny and interpreted on CPU: only checks the script runs
    python experiments/bench_attention.py --doc_len 512  # adds our kernel on packed 512-token documents

Prints forward, backward and forward+backward TFLOP/s, bf16, head_dim 128, sequences 2048/4096/8192, heads
32q/32kv and 64q/8kv, causal and full, every implementation measured in the same run. FLOPs count the two
S x S x D matmuls of the forward (4 B Hq S^2 D) and the five of the backward (QK^T recomputed, dV, dP, dQ, dK:
2.5x the forward), halved when causal. Method: each function is jit-compiled and called 3 times to warm up,
then timed over --runs calls, each ended by block_until_ready; the median is reported. The `err` column is
max |ours - reference| / max |reference| for the forward output (reference: cuDNN on GPU, else XLA).

On a GPU a row `pallas-mosaic` times our Mosaic GPU (Hopper) forward, whose backward is the Triton one.

With --doc_len L a row `pallas+docs` times our kernel on the same batch cut into documents of L tokens (segment
ids); its FLOPs count only the pairs inside documents (S^2 becomes S*L), so its milliseconds against the `pallas`
row show what segment-range tile skipping saves.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp

from dsjax.kernels import BlockSizes, default_blocks, flash_attention
from dsjax.kernels.blocks import gpu_heads_per_tile

FLOP_FORMULA = (
    "fwd = 4*B*Hq*S^2*D, bwd = 2.5*fwd, fwd+bwd = 3.5*fwd (matmul FLOPs only; x0.5 when causal)"
)
MODES = ("fwd", "bwd", "fwd+bwd")


def forward_flops(batch, heads, seq, head_dim, causal) -> float:
    return 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def median_seconds(fn, *args, runs: int) -> float:
    for _ in range(3):  # compile, then warm caches and autotuners
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_modes(attention, q, k, v, do, runs: int) -> dict[str, float]:
    """Median seconds of the forward, the backward alone (from saved residuals) and both."""
    forward = jax.jit(attention)
    with_residuals = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v))
    backward = jax.jit(lambda vjp, do: vjp(do))
    both = jax.jit(lambda q, k, v, do: jax.vjp(attention, q, k, v)[1](do))
    _, vjp = with_residuals(q, k, v)
    return {
        "fwd": median_seconds(forward, q, k, v, runs=runs),
        "bwd": median_seconds(backward, vjp, do, runs=runs),
        "fwd+bwd": median_seconds(both, q, k, v, do, runs=runs),
    }


def document_ids(batch: int, seq: int, doc_len: int):
    """Segment ids of documents of `doc_len` tokens packed back to back (the last one shorter)."""
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32) // doc_len + 1, (batch, seq))


def document_flops(batch, heads, seq, head_dim, causal, doc_len) -> float:
    """forward_flops counted inside documents only: the sum over documents of their own S^2 terms."""
    lengths = [doc_len] * (seq // doc_len) + ([seq % doc_len] if seq % doc_len else [])
    return sum(forward_flops(batch, heads, n, head_dim, causal) for n in lengths)


def implementations(causal: bool, interpret: bool, blocks: BlockSizes | None, documents=None) -> dict:
    impls = {
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=interpret, block_sizes=blocks),
    }
    if jax.default_backend() == "gpu":  # our Hopper forward (Mosaic GPU), with the Triton backward
        impls["pallas-mosaic"] = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="mosaic_gpu")
    if documents is not None:
        impls["pallas+docs"] = lambda q, k, v: flash_attention(
            q, k, v, documents, causal=causal, interpret=interpret, block_sizes=blocks
        )
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    impls["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    return impls


def inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


def relative_error(actual, expected) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.abs(actual - expected).max() / jnp.abs(expected).max())


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:100] if str(error).strip() else ''}"


def run_table(args, heads, kv_heads, causal, blocks=None, only=None):
    """One markdown table: a row per (seq, implementation); cells are TFLOP/s (ms)."""
    print(f"\n### {'causal' if causal else 'full'}, {heads}q/{kv_heads}kv heads, head_dim {args.head_dim}")
    print("\n| seq | batch | impl | fwd TFLOP/s (ms) | bwd TFLOP/s (ms) | fwd+bwd TFLOP/s (ms) | err |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    notes = []
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        q, k, v, do = inputs(batch, seq, heads, kv_heads, args.head_dim, args.dtype)
        flops = forward_flops(batch, heads, seq, args.head_dim, causal)
        documents = document_ids(batch, seq, args.doc_len) if args.doc_len else None
        impls = implementations(causal, args.smoke, blocks, documents)
        reference_name = "cudnn" if "cudnn" in impls else "xla"
        try:
            reference = jax.jit(impls[reference_name])(q, k, v)
        except Exception as error:  # noqa: BLE001 (e.g. out of memory): the table still gets its timings
            reference = None
            notes.append(f"no {reference_name} reference output at seq {seq}: {_short(error)}")
        for name, attention in impls.items():
            if only and name not in only:
                continue
            try:
                seconds = time_modes(attention, q, k, v, do, args.runs)
                err = ""
                if name in ("pallas", "pallas-mosaic") and reference is not None:
                    err = f"{relative_error(jax.jit(attention)(q, k, v), reference):.1e}"
            except Exception as error:  # noqa: BLE001 (out of memory, a shape cuDNN refuses): report, go on
                notes.append(f"{name} at seq {seq}: {_short(error)}")
                print(f"| {seq} | {batch} | {name} | n/a | n/a | n/a | |")
                continue
            row_flops = flops
            if "docs" in name:
                row_flops = document_flops(batch, heads, seq, args.head_dim, causal, args.doc_len)
            cells = [
                f"{row_flops * factor / seconds[mode] / 1e12:.1f} ({seconds[mode] * 1e3:.2f})"
                for mode, factor in zip(MODES, (1.0, 2.5, 3.5))
            ]
            print(f"| {seq} | {batch} | {name} | {' | '.join(cells)} | {err} |", flush=True)
    for note in notes:
        print(f"- {note}")


def sweep_candidates(group: int) -> list[BlockSizes]:
    """Tile sizes to try. GPU sizes are listed as score-matrix rows and converted to positions (a GPU tile holds
    `gpu_heads_per_tile(group)` heads per position); TPU tiles hold the whole group."""
    if jax.default_backend() == "tpu":
        return [
            BlockSizes.uniform(max(16, rows // group), bk) for rows in (256, 512, 1024) for bk in (256, 512, 1024)
        ]
    heads = gpu_heads_per_tile(group)
    pos = lambda rows: max(16, rows // heads)
    # (forward rows, forward keys, backward rows, backward keys); both backward kernels get the same tiles.
    configs = [
        (128, 64, 64, 64), (128, 128, 64, 64), (64, 64, 32, 64), (64, 128, 32, 128),
        (128, 64, 32, 128), (128, 128, 64, 128), (128, 32, 128, 32), (64, 64, 64, 32),
    ]
    return [BlockSizes(pos(fq), fk, pos(bq), bk, pos(bq), bk) for fq, fk, bq, bk in configs]


def sweep(args, heads, kv_heads, causal):
    """Times our kernel at the default and at several other tile sizes."""
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    group = heads // kv_heads
    for blocks in [default_blocks(backend, group, args.head_dim), *sweep_candidates(group)]:
        print(f"\nblocks: {blocks}")
        run_table(args, heads, kv_heads, causal, blocks=blocks, only=("pallas",))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--heads", nargs="+", default=["32/32", "64/8"], help="query/kv head counts")
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: batch = tokens // seq")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per measurement (median reported)")
    parser.add_argument("--doc_len", type=int, default=0, help="also time packed documents of this many tokens")
    parser.add_argument("--sweep", action="store_true", help="time other tile sizes (seq 4096 unless --seqs)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, kernels interpreted: runs on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seqs, args.heads, args.head_dim, args.tokens, args.runs = [128], ["4/4", "4/2"], 64, 256, 2
    args.dtype = jnp.dtype(args.dtype)

    device = jax.devices()[0]
    print(f"# Attention benchmark, {datetime.date.today().isoformat()}")
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
          + (", SMOKE RUN: kernels interpreted, numbers meaningless" if args.smoke else ""))
    print(f"dtype {args.dtype.name}, head_dim {args.head_dim}, {args.tokens} tokens per batch (batch = tokens // seq)")
    print(f"FLOPs: {FLOP_FORMULA}")
    print(f"method: jit, 3 warm-up calls, median of {args.runs} timed calls each ended by block_until_ready")
    for mask in args.masks:
        for spec in args.heads:
            heads, kv_heads = (int(n) for n in spec.split("/"))
            if args.sweep:
                if args.seqs == [2048, 4096, 8192]:
                    args.seqs = [4096]
                sweep(args, heads, kv_heads, mask == "causal")
            else:
                run_table(args, heads, kv_heads, mask == "causal")


if __name__ == "__main__":
    main()
