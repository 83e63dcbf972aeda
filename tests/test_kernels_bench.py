"""experiments/bench_attention.py stays runnable: a smoke run (tiny, kernels interpreted) prints its table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from dsjax.kernels.blocks import fit_blocks

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 25 s on 2 cores: the script's own smoke run; the kernels it times are tested elsewhere
def test_smoke_run_prints_tables(bench, capsys):
    bench.main(["--smoke", "--masks", "causal", "--heads", "4/2", "--doc_len", "32"])
    out = capsys.readouterr().out
    assert bench.FLOP_FORMULA in out
    for impl in ("pallas", "pallas\\+docs", "xla"):
        row = re.search(rf"^\| 128 \| 2 \| {impl} \|(.*)$", out, re.MULTILINE)
        assert row, f"no {impl} row in:\n{out}"
        assert len(re.findall(r"\d+\.\d+ \(\d+\.\d+\)", row.group(1))) == 3  # fwd, bwd, fwd+bwd
    error = float(re.search(r"^\| 128 \| 2 \| pallas \|.*\| ([0-9.e+-]+) \|$", out, re.MULTILINE).group(1))
    assert error < 1.5e-2  # bf16 forward against jax.nn.dot_product_attention


@pytest.mark.parametrize("group", [1, 8])
def test_sweep_candidates_are_valid_tiles(bench, group):
    for blocks in bench.sweep_candidates(group):
        assert fit_blocks(blocks, "gpu", 4096) == blocks


def test_document_flops_count_pairs_inside_documents(bench):
    """Four documents of 32 in a row of 128 do a quarter of the row's causal work; a short last one less."""
    whole = bench.forward_flops(2, 4, 128, 64, causal=True)
    assert bench.document_flops(2, 4, 128, 64, True, 32) == pytest.approx(whole / 4, rel=0.02)
    assert bench.document_flops(1, 1, 100, 64, False, 32) == 4 * 64 * (3 * 32**2 + 4**2)
