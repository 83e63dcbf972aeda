"""Trainer step time, this tree against an earlier commit, in one run: the tiny quickstart config, interleaved.

    python3 experiments/bench_trainer.py --baseline=d2fb2f9 [--steps=120] [--repeats=3]

The baseline is checked out with `git worktree` into a temporary directory; both trees train `tiny` from scratch
(no evaluation, no samples, no checkpoint until the end) in fresh workdirs, alternating, sharing one prepared
corpus. Tokens/s is read from each run's metrics.jsonl, leaving out the first logging window (it holds the compile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(tree: Path, workdir: Path, steps: int, env: dict) -> float:
    args = [sys.executable, "-m", "dsjax.main", "--config=tiny", f"--config.train.steps={steps}",
            "--config.eval.every_steps=0", "--config.log.samples=()", "--config.log.progress_bar=False",
            f"--config.checkpoint.every_steps={steps}", "--config.checkpoint.every_minutes=1000",
            "--config.log.tensorboard=False", f"--workdir={workdir}"]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a commit of this repository")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            env = {**os.environ, "DSJAX_CACHE": str(tmp / "cache"), "JAX_PLATFORMS": "cpu"}
            results = {"baseline": [], "this tree": []}
            for i in range(args.repeats):
                for label, tree in (("baseline", base), ("this tree", REPO)):
                    rate = run_once(tree, tmp / f"{label.replace(' ', '_')}-{i}", args.steps, env)
                    results[label].append(rate)
                    print(f"repeat {i}: {label:<10} {rate:8.0f} tokens/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    before, after = (statistics.median(results[k]) for k in ("baseline", "this tree"))
    print(f"median tokens/s: baseline {args.baseline} {before:.0f}, this tree {after:.0f}, ratio {after / before:.3f}")


if __name__ == "__main__":
    main()
