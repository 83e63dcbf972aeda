#!/usr/bin/env bash
# The first thing to run where a GPU (or TPU) is at hand: the kernel tests with the platform's kernel compiled
# (not interpreted), then the attention benchmark whose tables go into kernels/README.md.
#
#   bash experiments/device_check.sh            # tests, then the benchmark (with packed 512-token documents)
#   bash experiments/device_check.sh sweep      # tests, then the tile-size sweep at seq 4096
#
# Through the device tool: run(command="bash experiments/device_check.sh"). Only jax and pytest are needed
# (no grain or ml-collections). Logs go to $OUT (the device tool's folder) or runs/device_check.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/device_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$out/devices.txt"
# The test setup defaults to CPU; an empty JAX_PLATFORMS lets jax pick the accelerator.
JAX_PLATFORMS= DSJAX_KERNEL_TESTS=compiled python3 -m pytest -q -rs \
  tests/test_kernels.py tests/test_kernels_segments.py tests/test_kernels_mosaic_gpu.py 2>&1 | tee "$out/tests.txt"
tests_status=$?

if [ "${1:-bench}" = sweep ]; then
  python3 experiments/bench_attention.py --sweep --masks causal 2>&1 | tee "$out/sweep.md"
else
  python3 experiments/bench_attention.py --doc_len 512 2>&1 | tee "$out/bench.md"
fi
bench_status=$?
exit $((tests_status || bench_status))
