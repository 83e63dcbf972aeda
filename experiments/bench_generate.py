"""Generation speed: dsjax's KV-cache decoder against transformers `generate` (torch), same weights and prompts.

    python experiments/bench_generate.py            # tiny config and a ~100M shape, batch 1 and 16
    python experiments/bench_generate.py --smoke    # a very small run that only checks the script works

A random LlamaForCausalLM is saved as safetensors and loaded by both sides (float32, greedy, no early stop).
Method, the same for both: each setting is run once to warm up (compile), then timed `--runs` times (median) with
max_new_tokens=1 (prefill and the first token) and with max_new_tokens=N. Prefill tokens/s = batch * prompt_len /
t(1); decode tokens/s = batch * (N - 1) / (t(N) - t(1)). Ratios are dsjax / transformers from the same run.

The last columns bound what any float32 decoder built on XLA:CPU can reach on the machine: "matmul floor" times only
the decode step's matrix products (every layer's projections and the output head, the model's own weights, `batch`
rows, in a device loop like the decoder's) and gives batch / that time in tokens/s; "floor / transformers" is the
largest decode ratio those products allow. At batch 1 they stream every weight once per token (memory bandwidth).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.generate import Generator
from dsjax.interop.hf import load_model
from dsjax.model.linear import project
from dsjax.model.transformer import unstack_layers

CONTEXT = 1024  # the benchmark models' max_position_embeddings
SHAPES = {
    # configs/tiny.py's model
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # ~110M parameters: 12 layers of d_model 768 (GPT-2 small's body), DeepSeek's layout, vocab 16384
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "smoke": dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}


def median_seconds(fn, runs: int) -> float:
    fn()  # warm up: compile (dsjax) and allocator caches (both)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_program(model, batch: int, steps: int = 16):
    """(jitted fn, x, weights): `steps` rounds of the decode step's matrix products (every layer's weights and the
    head) on `batch` rows, in a device loop like the decoder's."""
    weights = [w for layer in unstack_layers(model) for w in jax.tree.leaves(nnx.to_pure_dict(layer)) if w.ndim >= 2]
    weights.append(model.lm_head[...])
    # o_proj (heads, head_dim, d_model) takes two input axes; every other weight one.
    n_ins = [2 if w.ndim == 3 and w.shape[0] != model.config.d_model else 1 for w in weights]
    width = max(math.prod(w.shape[:n]) for w, n in zip(weights, n_ins))

    @jax.jit
    def products(x, weights):
        def step(i, carry):  # the carry feeds each step, so no product is hoisted out of the loop
            total = carry
            for w, n_in in zip(weights, n_ins):
                rows = (x[:, : math.prod(w.shape[:n_in])] + carry).reshape((batch,) + w.shape[:n_in])
                total = total + project(rows, w, n_in).sum() * 1e-12  # every output summed: nothing sliced away
            return total
        return jax.lax.fori_loop(0, steps, step, jnp.float32(0))

    x = jnp.asarray(np.random.RandomState(0).randn(batch, width), jnp.float32)
    return products, x, weights


def matmul_floor(model, batch: int, runs: int, steps: int = 16) -> float:
    """Tokens/s of the decode step's matrix products alone (`floor_program`)."""
    products, x, weights = floor_program(model, batch, steps)
    seconds = median_seconds(lambda: products(x, weights).block_until_ready(), runs)
    return batch * steps / seconds


def bench_shape(name, batches, prompt_len, new_tokens, runs):
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=CONTEXT, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      initializer_range=0.02)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides generate exactly N tokens
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        model = load_model(tmp)
    params = sum(p.numel() for p in hf.parameters())
    generator = Generator(model)  # no tokenizer: ids in, ids out, no eos
    rows = []
    for batch in batches:
        prompts = np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, prompt_len))
        ids = [p.tolist() for p in prompts]
        torch_ids = torch.tensor(prompts)

        def ours(n):
            return lambda: generator.generate(ids, max_new_tokens=n)

        def theirs(n):
            def run():
                with torch.no_grad():
                    hf.generate(torch_ids, attention_mask=torch.ones_like(torch_ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False)
            return run

        result = {"floor": matmul_floor(model, batch, runs)}
        for side, make in (("dsjax", ours), ("transformers", theirs)):
            first = median_seconds(make(1), runs)
            full = median_seconds(make(new_tokens), runs)
            result[side] = (batch * prompt_len / first, batch * (new_tokens - 1) / max(full - first, 1e-9))
        rows.append((name, params, batch, result))
        print(f"  {name} batch {batch}: {result}", file=sys.stderr, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()
    if args.runs < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        parser.error("--runs and --prompt_len must be at least 1 and --new_tokens at least 2 (decode is timed "
                     "after the first token).")
    if args.prompt_len + args.new_tokens > CONTEXT:
        parser.error(f"--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} is beyond the benchmark "
                     f"models' context of {CONTEXT} tokens.")
    if args.smoke:
        settings = [("smoke", (1, 4), 8, 8)]
        args.runs = 1
    else:
        settings = [("tiny", (1, 16), args.prompt_len, args.new_tokens),
                    ("100m", (1, 16), args.prompt_len, args.new_tokens)]
    rows = []
    for name, batches, prompt_len, new_tokens in settings:
        rows += bench_shape(name, batches, prompt_len, new_tokens, args.runs)
    device = f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\nGeneration, float32 greedy, prompt {settings[0][2]} tokens, {settings[0][3]} new tokens; {device}; "
          f"{datetime.date.today().isoformat()}\n")
    print("| model | params | batch | prefill tok/s dsjax | transformers | ratio | decode tok/s dsjax | transformers "
          "| ratio | matmul floor tok/s | floor / transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, params, batch, r in rows:
        (pd, dd), (pt, dt), floor = r["dsjax"], r["transformers"], r["floor"]
        print(f"| {name} | {params / 1e6:.1f}M | {batch} | {pd:,.0f} | {pt:,.0f} | {pd / pt:.2f}x | {dd:,.0f} | "
              f"{dt:,.0f} | {dd / dt:.2f}x | {floor:,.0f} | {floor / dt:.2f}x |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; no table printed.", file=sys.stderr)
        sys.exit(130)
