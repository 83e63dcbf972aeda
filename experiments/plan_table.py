"""The README's `--plan` table: 7b and 67b compiled for 8 x H100, 64 x H100 (8 hosts), 8 x H200, v5p-128, v5e-256.

Each row is one `python -m dsjax.main --plan` command (printed before it runs), so any row can be regenerated
alone: `python experiments/plan_table.py --rows=67b:v5p-128`. Needs the optional compilers:
    pip install "jax[tpu]==0.10.2" "jax[cuda13-local]==0.10.2" "nvidia-cuda-nvcc==13.5.37"
Writes experiments/results/plan_table.json (every plan record) and prints the markdown table.

The settings per row (mesh, remat, micro-batch) are a starting point chosen to fit; `--plan_search` explores more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (config, target, overrides): remat=full with small micro-batches keeps activations within memory.
ROWS = [
    ("7b", "h100x8", {"mesh.shape": "1,8,1", "model.remat": "full", "train.grad_accum_steps": 72}),
    ("7b", "h100x64", {"mesh.shape": "1,64,1", "model.remat": "full", "train.grad_accum_steps": 9}),
    ("7b", "h200x8", {"mesh.shape": "1,8,1", "model.remat": "full", "train.grad_accum_steps": 36}),
    ("7b", "v5p-128", {"mesh.shape": "1,64,1", "model.remat": "save_dots", "train.grad_accum_steps": 12}),
    ("7b", "v5e-256", {"mesh.shape": "1,256,1", "model.remat": "full", "train.grad_accum_steps": 9}),
    ("67b", "h100x8", {"mesh.shape": "1,8,1", "model.remat": "full", "train.grad_accum_steps": 576}),
    ("67b", "h100x64", {"mesh.shape": "1,64,1", "model.remat": "full", "train.grad_accum_steps": 72}),
    ("67b", "h200x8", {"mesh.shape": "1,8,1", "model.remat": "full", "train.grad_accum_steps": 576}),
    ("67b", "v5p-128", {"mesh.shape": "1,64,1", "model.remat": "full", "train.grad_accum_steps": 72}),
    ("67b", "v5e-256", {"mesh.shape": "1,256,1", "model.remat": "full", "train.grad_accum_steps": 18}),
]


def command(config: str, target: str, overrides: dict) -> list[str]:
    return ([sys.executable, "-m", "dsjax.main", f"--config={config}", f"--plan={target}"]
            + [f"--config.{k}={v}" for k, v in overrides.items()])


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def markdown(records: list[dict]) -> str:
    lines = ["| config | target | mesh (data, fsdp, tensor) | remat | micro-batch / device | GiB / device "
             "(args + temps + outs - aliased) | of | fits | step s at 40% MFU | days for 2T tokens | compile s |",
             "|" + "---|" * 11]
    for r in records:
        b = r["bytes_per_device"]
        step = r.get("predicted_step_s")
        speed = f"{step:.1f} | {r['predicted_days']:.0f}" if step else "- | -"
        lines.append(f"| {r['config']} | {r['target']} | {tuple(r['mesh'].values())} | {r['remat']} | "
                     f"{r['micro_batch_per_device']} | {gib(b['total'])} | {gib(r['device_memory'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {speed} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help="comma-separated config:target rows (default: all)")
    parser.add_argument("--output", default=str(ROOT / "experiments" / "results" / "plan_table.json"))
    args = parser.parse_args()
    wanted = {tuple(r.split(":")) for r in args.rows.split(",") if r}
    output = Path(args.output)
    old = {(r["config"], r["target"]): r for r in json.loads(output.read_text())} if output.exists() else {}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for config, target, overrides in ROWS:
        if wanted and (config, target) not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "plan.json")
            cmd = command(config, target, overrides)
            print("$ python " + " ".join(cmd[1:]), flush=True)
            code = subprocess.run(cmd + [f"--plan_json={path}"], cwd=ROOT, env=env).returncode
            if not os.path.exists(path):
                print(f"row {config}:{target} failed (exit {code}) before a plan was written", file=sys.stderr)
                continue
            record = json.loads(Path(path).read_text())
            record["command"] = "python " + " ".join(cmd[1:])
            old[(config, target)] = record
    records = [old[(c, t)] for c, t, _ in ROWS if (c, t) in old]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=2))
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
