"""Where a CPU step's time goes: dsjax's real train step (or forward) traced with jax.profiler, op time by kind.

    python3 experiments/profile_step_cpu.py --shape=125m               # the train step
    python3 experiments/profile_step_cpu.py --shape=16m --step=forward
    python3 experiments/profile_step_cpu.py --smoke                    # a very small run that only checks the script

The step is the one `bench_train_cpu.py` times against torch (same shapes, same `make_train_step`). One warmed-up
step is traced; each XLA op of the trace is looked up in the step's optimized HLO: products (a `dot`, or a fusion
that holds one: XLA:CPU runs most as YNNPACK `ynn_fusion` ops) are split into the 2-D products of the projections
and the output head and attention's batched products; every other op is grouped by its name (YNNPACK also runs
some reductions). XLA runs two ops at a time where the graph allows, so op time adds up to more than the wall time;
"busy" is the wall time during which at least one op ran. The projections' rate is their FLOPs (counted from the
shapes) over their op time, to set beside `bench_matmul_cpu.py`'s rates for the same products alone and torch's.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
from bench_train_cpu import SHAPES, dsjax_side

RUNTIME = re.compile(r"^\$|Thunk|Pjit|Slinky|Threadpool|ParseArguments|block_until|try_to_block|ExecuteHelper|"
                     r"CommonPjRt|^end: ")
PROJECTIONS, ATTENTION = "products: projections, head", "products: attention (batched)"


def product_kinds(hlo: str) -> dict[str, str]:
    """Instruction name -> PROJECTIONS or ATTENTION, for every dot of the optimized HLO and every fusion holding one
    (a dot with batch dimensions is attention's)."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    kind_of_dots = lambda text: ATTENTION if "lhs_batch_dims" in text else PROJECTIONS
    kinds = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b(dot|fusion|custom-call)\((.*)$", hlo, re.M):
        name, op, rest = m.groups()
        if op == "dot":
            kinds[name] = kind_of_dots(rest)
        elif op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            body = bodies.get(called.group(1), "") if called else ""
            if re.search(r"\bdot\(", body):
                kinds[name] = kind_of_dots(body)
    return kinds


def product_flops(shape: dict, tokens: int, step: str) -> float:
    """FLOPs of the projections' and output head's products: 2 per multiply-add, x3 in training (the products of
    the two gradients)."""
    d, ff, h, kv = shape["d_model"], shape["d_ff"], shape["n_heads"], shape["n_kv_heads"]
    per_layer = d * d * 2 + 2 * d * (d // h) * kv + 3 * d * ff
    weights = shape["n_layers"] * per_layer + d * shape["vocab_size"]
    return 2 * tokens * weights * (3 if step == "train" else 1)


def op_kinds(trace_file: Path, products: dict[str, str]):
    """(op time by kind in s, op count by kind, the step's wall time in s, the time at least one op ran in s)."""
    events = json.load(gzip.open(trace_file))["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and "dur" in e and not RUNTIME.search(e["name"])]
    if not ops:
        raise SystemExit(f"{trace_file.name} holds no XLA op events: the profiler traced nothing of the step.")
    execute = [e["dur"] for e in events if e.get("ph") == "X" and e["name"].startswith("ThunkExecutor::Execute (wait")]
    wall = max(execute) if execute else max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
    seconds, counts = collections.Counter(), collections.Counter()
    for e in ops:
        kind = products.get(e["name"]) or re.sub(r"\.\d+$", "", e["name"])
        seconds[kind] += e["dur"] / 1e6
        counts[kind] += 1
    busy, end = 0.0, None
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return seconds, counts, wall / 1e6, busy / 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="125m", choices=[s for s in SHAPES if s != "smoke"])
    parser.add_argument("--step", default="train", choices=("train", "forward"))
    parser.add_argument("--top", type=int, default=12, help="op kinds listed (the rest summed)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}.")
    name = "smoke" if args.smoke else args.shape
    shape, batch, seq = SHAPES[name]
    tokens = np.random.RandomState(0).randint(0, shape["vocab_size"], (batch, seq + 1)).astype(np.int32)
    train, forward = dsjax_side(shape, batch, seq, tokens, "auto")
    run = train if args.step == "train" else forward
    run()
    run()  # warm up: compile, allocator caches
    start = time.perf_counter()
    run()
    untraced = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            run()
        trace_file = next(Path(folder).rglob("*.trace.json.gz"), None)
        if trace_file is None:
            raise SystemExit(f"jax.profiler wrote no *.trace.json.gz under {folder}: this jax "
                             f"({jax.__version__}) cannot make the Perfetto trace the script reads.")
        seconds, counts, wall, busy = op_kinds(trace_file, product_kinds(run.hlo()))
    total = sum(seconds.values())
    print(f"# {name} ({batch} x {seq}), {args.step} step, jax {jax.__version__}: {untraced:.2f} s untraced, "
          f"{wall:.2f} s traced, ops busy {busy:.2f} s ({100 * busy / wall:.0f}%), op time {total:.2f} s")
    print("| op kind | op time (ms) | share of op time | ops |")
    print("|---|---|---|---|")
    for kind, secs in seconds.most_common(args.top):
        print(f"| {kind} | {1e3 * secs:.1f} | {100 * secs / total:.1f}% | {counts[kind]} |")
    rest = seconds.most_common()[args.top:]
    if rest:
        print(f"| {len(rest)} other kinds | {1e3 * sum(s for _, s in rest):.1f} | "
              f"{100 * sum(s for _, s in rest) / total:.1f}% | {sum(counts[k] for k, _ in rest)} |")
    products = seconds[PROJECTIONS]
    if products:
        flops = product_flops(shape, batch * seq, args.step)
        print(f"# projections and head: {flops / 1e9:.1f} GFLOP in {products:.2f} s of op time, "
              f"{flops / products / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: nothing was measured.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not sys.exit: XLA's threads may still be mid-step, and interpreter shutdown then crashes
