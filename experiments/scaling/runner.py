"""Trains the points of a sweep with the real trainer and records each one's result to a JSONL file.

Each point is a normal dsjax run (`dsjax.train.trainer.train`, the `tiny` config with the point's shape, steps,
batch and learning rate) in its own workdir under `runs_dir`, so a point stopped half-way resumes from its checkpoint
the next time, and a point already in the results file is skipped. Held-out bits-per-byte is the trainer's own
`eval_bpb` after the last step, on the same `eval_batches` x `eval_batch` sequences of the built-in corpus's held-out
split for every point. The results file is rewritten whole through a temporary file, so it is never half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import time
from pathlib import Path

from experiments.scaling.family import Point


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every point of a sweep shares besides its shape, budget and hyperparameters."""

    base_config: str = "tiny"
    eval_batches: int = 16
    eval_batch: int = 16
    warmup_fraction: float = 0.05  # of each point's steps; the paper's 2000 steps assume runs of 10^5 steps
    schedule: str = "multistep"  # the paper's: 31.6% of the peak after 80% of the steps, 10% after 90%
    seed: int = 0
    checkpoint_minutes: float = 2.0
    overrides: tuple = ()  # extra ("section.key", value) pairs, e.g. (("data.cache_dir", "/tmp/c"),)


def point_config(point: Point, settings: RunSettings):
    """The trainer config of one point: the base config with the point's shape, budget and hyperparameters."""
    from dsjax.config import load_config

    config = load_config(settings.base_config)
    config.name = f"scaling-{point.key}"
    config.seed = settings.seed
    config.model.update(point.shape.model_overrides(point.vocab_size, point.seq_len))
    config.train.update(steps=point.steps, global_batch_size=point.batch, seq_len=point.seq_len)
    config.optim.update(lr=point.lr, schedule=settings.schedule,
                        warmup_steps=max(1, round(settings.warmup_fraction * point.steps)))
    config.eval.update(every_steps=point.steps, steps=settings.eval_batches, batch_size=settings.eval_batch, tasks="")
    config.checkpoint.update(every_steps=point.steps, every_minutes=settings.checkpoint_minutes, keep=1)
    config.log.update(every_steps=max(1, min(50, point.steps)), progress_bar=False, tensorboard=False, samples=())
    for key, value in settings.overrides:
        section, name = key.split(".", 1)
        config[section][name] = value
    return config


def read_results(path: Path) -> list[dict]:
    """The records of a results file (none if it does not exist); a line that is not JSON names file:line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg}); fix or remove that line.") from None
    return out


def write_results(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    partial.replace(path)


def _final_metrics(workdir: Path, steps: int) -> dict:
    """eval_bpb / eval_loss / loss at the last step, from the run's own metrics.jsonl (also after a resume)."""
    metrics = {}
    path = workdir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        row = json.loads(line)
        if row.get("step") == steps:
            metrics.update(row)
    return metrics


def run_point(point: Point, settings: RunSettings, runs_dir: Path) -> dict:
    """Trains (or resumes) one point and returns its record; raises if the run did not reach its last step.

    The trainer's own log goes to WORKDIR/train.log. A finished point leaves its record in WORKDIR/point.json, so
    the same point asked for again (by another sweep, or after a crash before the results file was written) is
    not trained twice and keeps its measured wall time.
    """
    from dsjax.config import validate
    from dsjax.train.trainer import train

    workdir = Path(runs_dir) / point.key
    saved = workdir / "point.json"
    if saved.exists():
        return json.loads(saved.read_text())
    config = point_config(point, settings)
    validate(config)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(workdir / "train.log", "a") as log_file, contextlib.redirect_stdout(log_file):
        result = train(config, str(workdir))
    wall = time.perf_counter() - start
    if result.get("preempted"):
        raise KeyboardInterrupt(f"stopped by {result['preempted'].name}; the point resumes from {workdir} next time")
    final = _final_metrics(workdir, point.steps)
    if "eval_bpb" not in final:
        raise RuntimeError(f"{workdir}: the run has no eval_bpb at its last step {point.steps}; see its metrics.jsonl.")
    record = dict(point.record(), bpb=final["eval_bpb"], loss=final["eval_loss"], train_loss=final.get("loss"),
                  C_trained=point.M * point.D, wall_s=round(wall, 2), date=datetime.date.today().isoformat())
    (workdir / ".point.json.partial").write_text(json.dumps(record, sort_keys=True))
    (workdir / ".point.json.partial").replace(saved)
    return record


def run_sweep(points: list[Point], settings: RunSettings, results: Path, runs_dir: Path, *, kind: str,
              log=print, progress=True) -> list[dict]:
    """Runs every point not yet in `results`, appending each record as it finishes; returns all records of `kind`."""
    from tqdm import tqdm

    done = {r["key"] for r in read_results(results) if r.get("kind") == kind}
    todo = [p for p in points if p.key not in done]
    if len(todo) < len(points):
        log(f"{kind}: {len(points) - len(todo)} of {len(points)} points already in {results}, skipped")
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=kind, unit="point", disable=not progress)
    for point in todo:
        bar.set_postfix_str(f"C={point.C:.2g} {point.shape.name} lr={point.lr:.2g} b={point.batch} "
                            f"{point.steps} steps")
        record = dict(run_point(point, settings, runs_dir), kind=kind)
        write_results(results, read_results(results) + [record])
        bar.update(1)
        bar.write(f"  {kind} C={point.C:.3g} M={point.M:.3g} D={point.D:.3g} lr={point.lr:.3g} batch={point.batch}: "
                  f"bpb {record['bpb']:.4f} ({record['wall_s']:.0f} s)")
    bar.close()
    keys = {p.key for p in points}
    return [r for r in read_results(results) if r.get("kind") == kind and r["key"] in keys]
