"""Task specs (`bpb:FILES`, `mc:FILE.jsonl`, `gen:FILE.jsonl`) and running them: what the CLI and the trainer share.

A spec is `KIND:ARGUMENT`. bpb takes comma-separated .txt/.jsonl/.parquet files, directories or globs, or one
prepared dataset directory (its val split); mc and gen one JSONL file each. `run_task` returns a plain dict (kind, metrics, skipped counts, seconds) ready for JSON.
"""

from __future__ import annotations

import dataclasses
import time

from dsjax.errors import ConfigError
from dsjax.eval import bpb, multiple_choice
from dsjax.eval.scoring import Scorer

KINDS = ("bpb", "mc", "gen")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str
    argument: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.argument}"


def parse_spec(spec: str) -> TaskSpec:
    kind, sep, argument = spec.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"--task={spec}: unknown task kind {kind!r}; use one of {', '.join(KINDS)} (as KIND:FILE).")
    if not sep or not argument:
        raise ConfigError(f"--task={spec} names no file; write it as {kind}:FILE.")
    return TaskSpec(kind, argument)


def run_task(spec: TaskSpec, scorer: Scorer, tokenizer, *, model=None, window=None, stride=None,
             generation: dict | None = None, progress_factory=None, stream=None) -> dict:
    """Runs one task. progress_factory(description) -> callable(n, total) advancing a progress bar, or None."""
    progress_factory = progress_factory or (lambda desc: None)
    start = time.perf_counter()
    if spec.kind == "bpb" and bpb.is_prepared(spec.argument):
        docs, n_bytes = bpb.read_prepared(spec.argument, tokenizer)
        skipped = {}
        metrics = bpb.score_documents(scorer, docs, n_bytes, window=window, stride=stride,
                                      progress=progress_factory(spec.name))
        details = None
    elif spec.kind == "bpb":
        texts, skipped = bpb.read_texts(spec.argument.split(","), stream=stream)
        progress = progress_factory(spec.name)
        metrics = bpb.bits_per_byte(scorer, tokenizer, texts, window=window, stride=stride, progress=progress)
        details = None
    elif spec.kind == "mc":
        examples, skipped = multiple_choice.read_examples(spec.argument, stream=stream)
        progress = progress_factory(spec.name)
        metrics, details = multiple_choice.evaluate(scorer, tokenizer, examples, progress)
    else:
        from dsjax.eval import generation as gen

        examples, skipped = gen.read_examples(spec.argument, stream=stream)
        progress = progress_factory(spec.name)
        metrics, details = gen.evaluate(model, tokenizer, examples, progress=progress, mesh=scorer.mesh,
                                        rules=scorer.rules, **(generation or {}))
    result = {"task": spec.name, "kind": spec.kind, "metrics": metrics, "skipped": skipped,
              "seconds": round(time.perf_counter() - start, 3)}
    if details is not None:
        result["details"] = details
    return result
