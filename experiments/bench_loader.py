"""Loader throughput: packed training batches per second at seq_len 4096, on one CPU core.

    python experiments/bench_loader.py [--dataset=PREPARED_DIR] [--seq_len=4096] [--batch=8] [--batches=1000]

Without --dataset it measures two cases made from the built-in corpus (prepared into the cache on first use): the
corpus itself, top-level source blocks of ~1.5k tokens, and the same text cut at blank lines into ~100-token documents,
the hard case (packing and reading cost per document, not per token). The process is pinned to one core and
documents are read in the calling thread (data.num_threads=0), so the figure is what one core sustains; the target
is >= 1M tokens/s, so that the loader never bounds training.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsjax.config import default_config  # noqa: E402
from dsjax.data import corpus, pipeline, prepare  # noqa: E402


def measure(dataset: str, seq_len: int, batch: int, batches: int) -> str:
    config = default_config()
    config.data.datasets = dataset
    config.data.num_threads = 0
    config.model.vocab_size = 1 << 20  # only the loader runs here; any tokenizer fits
    loader = pipeline.make_loader(config, "train", seq_len=seq_len, global_batch_size=batch)
    for _ in range(10):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    stats = loader.stats
    return (f"{batches * batch * seq_len / seconds / 1e6:.2f}M tokens/s "
            f"({stats['tokens'] / stats['documents']:.0f} tokens per document)")


def paragraphs_dataset(builtin: dict, directory: Path) -> str:
    """The built-in corpus cut at blank lines, prepared with its tokenizer."""
    lines = [json.dumps({"text": p}) for f in corpus.stdlib_files() for p in f.read_text("utf-8").split("\n\n")]
    (directory / "paragraphs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare.prepare([str(directory / "paragraphs.jsonl")], builtin["tokenizer"], directory / "paragraphs",
                    progress=False, log=open(os.devnull, "w"))
    return str(directory / "paragraphs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="a prepared dataset directory (default: the two built-in cases)")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--batches", type=int, default=300, help="batches timed (after 10 of warm-up)")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(f"loader throughput at seq_len {args.seq_len}, {args.batch} rows per batch, one core of "
          f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}:")
    if args.dataset:
        print(f"  {args.dataset}: {measure(args.dataset, args.seq_len, args.batch, args.batches)}")
        return
    print(f"  built-in corpus: {measure('builtin', args.seq_len, args.batch, args.batches)}")
    builtin = corpus.ensure_builtin(default_config())
    with tempfile.TemporaryDirectory() as tmp:
        dataset = paragraphs_dataset(builtin, Path(tmp))
        print(f"  built-in corpus cut into paragraphs: {measure(dataset, args.seq_len, args.batch, args.batches)}")


if __name__ == "__main__":
    main()
