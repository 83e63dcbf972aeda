"""Tokenizing many documents on every core: worker processes, each with its own copy of the tokenizer.

sentencepiece's batch encode runs on one core whatever `num_threads` it is given (0.2.3 here: its CPU time equals
its wall time) and holds the GIL, so threads do not help; processes do. Hugging Face tokenizers already spread
`encode_batch` over Rust threads, so they stay in this process. Workers start with "spawn", which is safe in a
process that already runs JAX's threads, and only once a batch is big enough to repay their start (~0.2 s); like
any spawned worker they import the main script again, so the CLIs use them and the built-in corpus (small, and
prepared from inside whatever script trains) does not.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Sequence

import numpy as np

from dsjax.errors import DataError
from dsjax.data.tokenizer import Tokenizer, load_tokenizer

PARALLEL_CHARS = 1 << 20  # smaller batches are encoded in this process

_worker_tokenizer: Tokenizer | None = None


def _start_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(path)


def _encode_in_worker(text: str) -> np.ndarray:
    return np.asarray(_worker_tokenizer.encode(text), dtype=np.int32)


class Encoder:
    """`encoder(texts)` -> token ids of each text, in order; `workers` 0 means one per core."""

    def __init__(self, tokenizer: Tokenizer, workers: int = 0):
        self.tokenizer = tokenizer
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, texts: Sequence[str]) -> list:
        parallel = self.workers > 1 and self.tokenizer.kind == "sentencepiece"
        if not parallel or sum(len(t) for t in texts) < PARALLEL_CHARS:
            return self.tokenizer.encode_batch(texts)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(str(self.tokenizer.path),),
            )
        try:
            return list(self._pool.map(_encode_in_worker, texts, chunksize=max(1, len(texts) // (8 * self.workers))))
        except BrokenProcessPool:
            raise DataError(
                "the tokenizer worker processes died; run prepare from its CLI or under "
                "`if __name__ == '__main__':` (workers re-import the main script), or pass workers=1."
            ) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
