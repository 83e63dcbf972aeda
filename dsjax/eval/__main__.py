"""python -m dsjax.eval --checkpoint=PATH --task=bpb:FILES --task=mc:FILE.jsonl [--task=gen:FILE.jsonl] [--output=F]

PATH: a dsjax checkpoint (training workdir, checkpoint root or one step directory) or a Hugging Face model
directory. Several tasks run in one go on one loaded model; the results go to the console as a table and, with
--output, to a JSON file (per-task metrics, counts, the checkpoint, the date). Mistakes a user can make print one
line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dsjax import errors

USER_ERRORS = (errors.ConfigError, errors.DataError, errors.CheckpointNotFound, errors.CheckpointError)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dsjax.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="dsjax checkpoint/workdir or Hugging Face model dir")
    parser.add_argument("--task", action="append", required=True, metavar="KIND:FILES",
                        help="bpb:FILES (comma-separated files/dirs/globs), mc:FILE.jsonl or gen:FILE.jsonl; repeatable")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: the one found with the checkpoint)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--details", action="store_true", help="add every example's scores to --output")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per forward pass (packed sequences)")
    parser.add_argument("--window", type=int, help="bpb: tokens per window (default: the model's context)")
    parser.add_argument("--stride", type=int, help="bpb: new tokens scored per window (default: the window)")
    parser.add_argument("--mesh", default="-1,1,1", help="mesh shape over (data, fsdp, tensor); -1 takes the rest")
    parser.add_argument("--dtype", help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--attention", help="attention backend: xla, cudnn, pallas or auto")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="gen: tokens generated at most")
    parser.add_argument("--stop", action="append", default=None, help="gen: a stop string (repeatable)")
    parser.add_argument("--extractor", default="exact", help="gen: exact or last_number")
    parser.add_argument("--chat", action="store_true", help="gen: wrap prompts in the chat template")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def progress_bars(disabled: bool):
    from tqdm import tqdm

    def factory(description):
        if disabled:
            return None
        bar = tqdm(desc=description, unit="seq", file=sys.stderr, leave=False)

        def advance(n, total):
            if bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    return factory


def format_table(results: list[dict]) -> str:
    """Task / metric / value, one metric a line; accuracies and rates with four decimals, counts as integers."""
    rows = [("task", "metric", "value")]
    for result in results:
        for i, (name, value) in enumerate(result["metrics"].items()):
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append((result["task"] if i == 0 else "", name, text))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_mesh(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise errors.ConfigError(f"--mesh={text} must be three comma-separated integers (data,fsdp,tensor).") from None


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args) -> dict:
    from dsjax.eval import runtime, tasks
    from dsjax.eval.scoring import Scorer

    specs = [tasks.parse_spec(s) for s in args.task]
    if args.extractor not in ("exact", "last_number"):
        raise errors.ConfigError(f"--extractor={args.extractor} is neither exact nor last_number.")
    overrides = {k: getattr(args, k) for k in ("dtype", "attention") if getattr(args, k)}
    rt = runtime.load(args.checkpoint, tokenizer=args.tokenizer, mesh_shape=parse_mesh(args.mesh), **overrides)
    scorer = Scorer(rt.model, rt.mesh, rt.rules, batch_size=args.batch_size)
    generation = dict(max_new_tokens=args.max_new_tokens, stop=args.stop, extractor=args.extractor, chat=args.chat,
                      batch_size=args.batch_size)
    results = []
    for spec in specs:
        result = tasks.run_task(spec, scorer, rt.tokenizer, model=rt.model, window=args.window, stride=args.stride,
                                generation=generation, progress_factory=progress_bars(args.no_progress))
        if not args.details:
            result.pop("details", None)
        results.append(result)
    report = {
        "checkpoint": str(Path(args.checkpoint).expanduser().absolute()),
        "tokenizer": str(rt.tokenizer.path),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": f"{len(rt.mesh.devices.flat)} x {rt.mesh.devices.flat[0].device_kind}",
        "mesh": dict(rt.mesh.shape),
        "tasks": results,
    }
    print(format_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results -> {args.output}")
    return report


if __name__ == "__main__":
    main()
