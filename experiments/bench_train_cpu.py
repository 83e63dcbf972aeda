"""CPU train-step and forward speed: dsjax's real step against Hugging Face Llama in torch (eager, torch.compile).

    python3 experiments/bench_train_cpu.py                     # tiny, 16m, 125m; train and forward
    python3 experiments/bench_train_cpu.py --shapes=16m --repeats=5 --no-compile
    python3 experiments/bench_train_cpu.py --attention=xla     # dsjax with another attention backend
    python3 experiments/bench_train_cpu.py --layer_loop=scan   # dsjax's layers in a scan (auto unrolls on CPU)
    python3 experiments/bench_train_cpu.py --smoke             # a very small run that only checks the script works

Both sides run the same shape in float32 on the same random tokens: dsjax's jitted train step (the trainer's own
`make_train_step`, next-token loss, AdamW with clipping, `model.attention` and `model.layer_loop` auto unless
`--attention`, `--layer_loop`) and a torch step (forward, the mean
cross-entropy, backward, clipping, AdamW). Forward is the logits of one batch (no gradient). Each side is warmed up
(compile), then timed over `--steps` steps (median). Each side runs in its own process (in one process the two
runtimes' idle worker threads spin and slow each other 2-4x), the processes interleaved in `--repeats` rounds, and
a ratio is the median of the per-round ratios (tokens/s dsjax / tokens/s torch), so slow background load hits both
sides of a round alike. The load average is printed before and after; compare numbers only from a quiet machine.
"cores used" is each side's process CPU time over the wall time of its timed steps, the lowest of the rounds: on a
virtual machine whose host takes cores away for a while it drops well below the core count, and such a round's
numbers say nothing about either side.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.config import load_config
from dsjax.model import init_model
from dsjax.model.config import ModelConfig
from dsjax.train.loss import next_token_loss
from dsjax.train.optimizer import make_optimizer, make_schedule
from dsjax.train.step import make_train_step

# (model shape, batch, seq). tiny is configs/tiny.py's model and batch.
SHAPES = {
    "tiny": (dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384), 32, 128),
    "16m": (dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024), 8, 512),
    "125m": (dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048), 8, 512),
    "smoke": (dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64), 2, 32),
}


def dsjax_side(shape: dict, batch: int, seq: int, tokens: np.ndarray, attention: str, layer_loop: str = "auto"):
    cfg = ModelConfig(**shape, max_seq_len=seq, dtype="float32", attention=attention, layer_loop=layer_loop,
                      init_std=0.02)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    optim = load_config("tiny").optim
    schedule = make_schedule(optim, 1e-3, 1000)
    tx = make_optimizer(optim, schedule)
    step = jax.jit(make_train_step(graphdef, tx, lambda m, b, f: (*next_token_loss(m, b), {}), 1, schedule),
                   donate_argnums=(0,))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
            "segment_ids": np.ones((batch, seq), np.int32), "loss_weights": np.ones((batch, seq), np.float32)}
    data = {k: jnp.asarray(v) for k, v in data.items()}
    holder = [state]

    def train():
        holder[0], metrics = step(holder[0], data)
        jax.block_until_ready(metrics["loss"])

    forward_fn = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))

    def forward():
        jax.block_until_ready(forward_fn(holder[0]["params"], data["tokens"]))

    # The optimized HLO of each step, for experiments/profile_step_cpu.py (compiles again).
    train.hlo = lambda: step.lower(holder[0], data).compile().as_text()
    forward.hlo = lambda: forward_fn.lower(holder[0]["params"], data["tokens"]).compile().as_text()
    return train, forward


def torch_side(shape: dict, batch: int, seq: int, tokens: np.ndarray, compiled: bool):
    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"],
                      intermediate_size=shape["d_ff"], num_hidden_layers=shape["n_layers"],
                      num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
                      max_position_embeddings=seq, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.tensor(tokens[:, 1:], dtype=torch.long)
    loss_of = lambda logits: torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              labels.reshape(-1))
    run = torch.compile(model) if compiled else model

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(run(input_ids=inputs).logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def forward():
        model.eval()
        with torch.no_grad():
            run(input_ids=inputs).logits

    return train, forward


def worker(side: str, name: str, steps: int, attention: str, layer_loop: str) -> None:
    """Runs one side on one shape in this process and prints its median train and forward step times as JSON."""
    shape, batch, seq = SHAPES[name]
    tokens = np.random.RandomState(0).randint(0, shape["vocab_size"], (batch, seq + 1)).astype(np.int32)
    fns = (dsjax_side(shape, batch, seq, tokens, attention, layer_loop) if side == "dsjax"
           else torch_side(shape, batch, seq, tokens, compiled=side == "compile"))
    out = {}
    for kind, fn in zip(("train", "forward"), fns):
        fn()
        fn()  # warm up: compile, allocator caches
        times = []
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[kind] = statistics.median(times)
        out[f"{kind}_cores"] = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    print(json.dumps(out))


def run_worker(side: str, name: str, steps: int, attention: str, layer_loop: str) -> dict:
    done = subprocess.run([sys.executable, __file__, f"--worker={side}", f"--shapes={name}", f"--steps={steps}",
                           f"--attention={attention}", f"--layer_loop={layer_loop}"],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode != 0:
        raise SystemExit(f"{side} on {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,16m,125m")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of one process per side")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (median)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "blocked"),
                        help="dsjax's model.attention (auto: blocked on CPU)")
    parser.add_argument("--layer_loop", default="auto", choices=("auto", "scan", "unrolled"),
                        help="dsjax's model.layer_loop (auto: unrolled on CPU)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.shapes, args.steps, args.attention, args.layer_loop)
    names = ["smoke"] if args.smoke else args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.exit(2, f"--shapes: {unknown[0]!r} is not a shape; known: {', '.join(SHAPES)}.\n")
    repeats, steps = (1, 2) if args.smoke else (args.repeats, args.steps)
    sides = ["dsjax", "eager"] + (["compile"] if args.compile else [])
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), float32, dsjax attention "
          f"{args.attention}, layer_loop {args.layer_loop}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| shape (batch x seq) | step | dsjax tokens/s | torch eager tokens/s | dsjax / eager | cores used, dsjax "
          "/ eager |" + (" torch.compile tokens/s | dsjax / compile |" if args.compile else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for name in names:
        shape, batch, seq = SHAPES[name]
        rounds = [{side: run_worker(side, name, steps, args.attention, args.layer_loop) for side in sides}
                  for _ in range(repeats)]
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(init_model(ModelConfig(**shape)), nnx.Param)))
        for kind in ("train", "forward"):
            rate = lambda side: statistics.median(batch * seq / r[side][kind] for r in rounds)
            ratio = lambda side: statistics.median(r[side][kind] / r["dsjax"][kind] for r in rounds)
            cores = lambda side: min(r[side][f"{kind}_cores"] for r in rounds)
            row = (f"| {name}, {n_params / 1e6:.1f}M ({batch} x {seq}) | {kind} | {rate('dsjax'):.0f} | "
                   f"{rate('eager'):.0f} | {ratio('eager'):.2f}x | {cores('dsjax'):.2f} / {cores('eager'):.2f} |")
            if args.compile:
                row += f" {rate('compile'):.0f} | {ratio('compile'):.2f}x |"
            print(row, flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the rows printed so far are complete, the rest was not measured.", file=sys.stderr)
        sys.exit(130)
