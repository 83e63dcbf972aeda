"""experiments/bench_generate.py, bench_matmul_cpu.py and bench_train_cpu.py stay runnable, and the decode "matmul
floor" does the work it claims: every weight of the step multiplied in full, nothing sliced or hoisted away by XLA."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.interop.hf import load_model

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_generate():
    return load_script("bench_generate")


def test_matmul_floor_multiplies_every_weight_in_full(bench_generate, tmp_path):
    cfg = LlamaConfig(**bench_generate.SHAPES["smoke"], max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    batch = 3
    products, x, weights = bench_generate.floor_program(model, batch, steps=2)
    # q, k, v, o, gate, up, down per layer, and the output head; the embedding is a lookup, not a product.
    assert len(weights) == 7 * cfg.num_hidden_layers + 1
    assert sum(w.size for w in weights) == sum(
        p.numel() for n, p in LlamaForCausalLM(cfg).named_parameters() if "proj" in n or "lm_head" in n)
    cost = products.lower(x, weights).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts the loop body once: one round of products (2 * batch * weights) plus the small sums and adds.
    matmul_flops = 2 * batch * sum(w.size for w in weights)
    assert matmul_flops <= cost["flops"] < 1.1 * matmul_flops


@pytest.mark.slow  # ~25 s on 2 cores: both sides of the generation bench on a toy shape
def test_bench_generate_smoke_prints_its_table():
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_generate.py"), "--smoke"], capture_output=True,
                         text=True, check=True).stdout
    rows = re.findall(r"^\| smoke \| .* \| (\d[\d,]*) \| (\d+\.\d+)x \|$", out, re.MULTILINE)
    assert len(rows) == 2, out  # batch 1 and 4, each with a floor and its ratio


@pytest.mark.slow  # ~15 s: two worker processes
def test_bench_matmul_smoke_prints_its_table():
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_matmul_cpu.py"), "--smoke"], capture_output=True,
                         text=True, check=True).stdout
    assert re.search(r"^\| 1 x 32 x 64 \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \|$", out, re.MULTILINE), out
    assert re.search(r"^\| 16 x 64 x 32 \|", out, re.MULTILINE), out


@pytest.mark.slow  # ~30 s: one dsjax and one torch worker process
def test_bench_train_smoke_prints_rates_ratios_and_cores_used():
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_train_cpu.py"), "--smoke", "--no-compile"],
                         capture_output=True, text=True, check=True).stdout
    row = r"^\| smoke, [\d.]+M \(2 x 32\) \| (train|forward) \| \d+ \| \d+ \| [\d.]+x \| ([\d.]+) / ([\d.]+) \|$"
    rows = re.findall(row, out, re.MULTILINE)
    assert [kind for kind, *_ in rows] == ["train", "forward"], out
    # Both sides used some CPU. (No upper bound: over a smoke step of under a millisecond the measure is not bounded
    # by the core count; torch's forward read as 2.3 of 2 cores here.)
    assert all(float(c) > 0 for _, *cores in rows for c in cores), out


@pytest.mark.slow  # ~25 s: two traced smoke steps
@pytest.mark.parametrize("step,products", [("train", 2 * 7 * 3 + 3), ("forward", 2 * 7 + 1)])
def test_profile_step_finds_every_projection_product(step, products):
    """The smoke model has 2 layers of 7 projections and an output head; training multiplies each 3 times (forward,
    the two gradients). Every one of them must be found in the trace through the optimized HLO."""
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "profile_step_cpu.py"), "--smoke", f"--step={step}"],
                         capture_output=True, text=True, check=True).stdout
    row = re.search(r"^\| products: projections, head \| [\d.]+ \| [\d.]+% \| (\d+) \|$", out, re.MULTILINE)
    assert row and int(row.group(1)) == products, out
