"""Matrix products on the CPU: XLA (what every dsjax step runs) against torch (MKL), on the models' own shapes.

    python3 experiments/bench_matmul_cpu.py            # the 110M/125M shapes at 1, 16 and 4096 rows
    python3 experiments/bench_matmul_cpu.py --dtype=bfloat16   # both sides in bfloat16 (float32 accumulation in XLA)
    python3 experiments/bench_matmul_cpu.py --smoke    # a very small run that only checks the script works

Rows are tokens: 1 and 16 are decode steps (experiments/bench_generate.py), 4096 the 8 x 512 batch of
experiments/bench_train_cpu.py. Each (rows, in, out) product is x (rows, in) @ w (in, out). Decode-sized products
run over distinct weight matrices, `--weights_mb` of them in all, so they stream their weights from memory as in a
model instead of finding them in cache. Times are the median of `--runs`. Each side runs in its own process (two
runtimes' idle threads in one process slow each other), XLA jitted with the installed jax's defaults, torch with all
cores. GB/s counts the weight bytes read once per product. float32 unless `--dtype`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# (rows, in, out): the projections of the 125M train shape (d 768, FFN 2048, vocab 32000) and of a decode step.
SHAPES = [(rows, k, n) for rows in (1, 16) for k, n in ((768, 768), (768, 2048), (2048, 768))] + [
    (4096, 768, 768), (4096, 768, 2048), (4096, 2048, 768), (4096, 768, 32000)]
SMOKE = [(1, 32, 64), (16, 64, 32)]


DTYPES = {"float32": 4, "bfloat16": 2}  # bytes per element


def weights_for(rows: int, k: int, n: int, budget: int) -> int:
    """Distinct weights per timed call: enough bytes (~`budget` MB in float32) that small products stream from memory."""
    return max(1, min(64, budget * 2**20 // (4 * k * n))) if rows < 512 else 1


def time_side(side: str, shapes, runs: int, budget: int, dtype: str) -> list[float]:
    rs = np.random.RandomState(0)
    out = []
    for rows, k, n in shapes:
        count = weights_for(rows, k, n, budget * 4 // DTYPES[dtype])
        x = rs.randn(rows, k).astype(np.float32)
        ws = [rs.randn(k, n).astype(np.float32) for _ in range(count)]
        if side == "xla":
            import jax
            import jax.numpy as jnp

            xj, wj = jnp.asarray(x, dtype), [jnp.asarray(w, dtype) for w in ws]
            run = jax.jit(lambda x, ws: [jnp.matmul(x, w, preferred_element_type=jnp.float32) for w in ws])
            call = lambda: jax.block_until_ready(run(xj, wj))
        else:
            import torch

            to = getattr(torch, dtype)
            xt, wt = torch.from_numpy(x).to(to), [torch.from_numpy(w).to(to) for w in ws]
            call = lambda: [xt @ w for w in wt]
        call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times) / count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--weights_mb", type=int, default=256, help="weight bytes per timed call of small products")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--side", choices=("xla", "torch"), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.runs < 1 or args.weights_mb < 1:
        parser.error("--runs and --weights_mb must be at least 1.")
    shapes = SMOKE if args.smoke else SHAPES
    runs, budget = (1, 1) if args.smoke else (args.runs, args.weights_mb)
    if args.side:
        print(json.dumps(time_side(args.side, shapes, runs, budget, args.dtype)))
        return
    seconds = {}
    for side in ("xla", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--runs={runs}",
               f"--weights_mb={budget}", f"--dtype={args.dtype}"] + (["--smoke"] if args.smoke else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            sys.exit(f"the {side} worker failed (exit {result.returncode}): {last}")
        seconds[side] = json.loads(result.stdout.strip().splitlines()[-1])
    import jax
    import torch

    print(f"# {datetime.date.today().isoformat()} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {args.dtype}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| rows x in x out | XLA GFLOP/s | torch GFLOP/s | XLA / torch | XLA GB/s of weights |")
    print("|---|---|---|---|---|")
    for (rows, k, n), tx, tt in zip(shapes, seconds["xla"], seconds["torch"]):
        flops = 2 * rows * k * n
        print(f"| {rows} x {k} x {n} | {flops / tx / 1e9:.1f} | {flops / tt / 1e9:.1f} | {tt / tx:.2f}x | "
              f"{DTYPES[args.dtype] * k * n / tx / 1e9:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; no table printed.", file=sys.stderr)
        sys.exit(130)
