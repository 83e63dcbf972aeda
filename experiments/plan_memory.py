"""The README's memory numbers for the chunked cross-entropy and sequence parallelism, from `--plan` compiles.

Chunked cross-entropy: 7b on h100x8 and 67b on h100x64 with `model.loss_chunk=0` (full logits) and the default.
Sequence parallelism: 7b on h100x8 over meshes (1, 8/t, t), 4 sequences per data-parallel rank and micro-batch,
with the rule `act_seq` -> None and -> tensor. Each row is one `python -m dsjax.main --plan` command, printed
before it runs. Needs the optional compilers of the README's `--plan` section (the CUDA plugin here).
Writes experiments/results/plan_memory.json and prints the per-device temporaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsjax.sharding import DEFAULT_RULES  # noqa: E402


def rules(act_seq) -> str:
    return repr(tuple((name, act_seq if name == "act_seq" else target) for name, target in DEFAULT_RULES))


FULL = {"model.remat": "full"}
ROWS = [
    ("loss_chunk=0", "7b", "h100x8", {**FULL, "mesh.shape": "1,8,1", "train.grad_accum_steps": 72,
                                      "model.loss_chunk": 0}),
    ("loss_chunk default", "7b", "h100x8", {**FULL, "mesh.shape": "1,8,1", "train.grad_accum_steps": 72}),
    ("loss_chunk=0", "67b", "h100x64", {**FULL, "mesh.shape": "1,64,1", "train.grad_accum_steps": 72,
                                        "model.loss_chunk": 0}),
    ("loss_chunk default", "67b", "h100x64", {**FULL, "mesh.shape": "1,64,1", "train.grad_accum_steps": 72}),
] + [
    (f"act_seq={sp}", "7b", "h100x8", {**FULL, "mesh.shape": f"1,{8 // t},{t}", "train.grad_accum_steps": 72 * t,
                                      "mesh.rules": rules(sp)})
    for t in (2, 4, 8) for sp in (None, "tensor")
]


def main() -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    records = []
    for label, config, target, overrides in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "plan.json")
            cmd = ([sys.executable, "-m", "dsjax.main", f"--config={config}", f"--plan={target}"]
                   + [f"--config.{k}={v}" for k, v in overrides.items()])
            print("$ python " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd + [f"--plan_json={path}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            if not os.path.exists(path):
                print(f"row {label} {config}:{target} failed before a plan was written", file=sys.stderr)
                continue
            record = dict(json.loads(Path(path).read_text()), label=label, command="python " + " ".join(cmd[1:]))
        records.append(record)
        b = record["bytes_per_device"]
        print(f"{label:20s} {config:4s} {target:8s} mesh {tuple(record['mesh'].values())} micro-batch/device "
              f"{record['micro_batch_per_device']}: temporaries {b['temporaries'] / 2**30:.2f} GiB, total "
              f"{b['total'] / 2**30:.2f} GiB", flush=True)
    output = ROOT / "experiments" / "results" / "plan_memory.json"
    output.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
