"""Shared helpers for trainer tests: a small config and a synthetic, resumable data task."""

import numpy as np

from dsjax.config import load_config
from dsjax.train.loop import Task
from dsjax.train.loss import next_token_loss

VOCAB = 128


class SyntheticLoader:
    """Batch i is a pure function of (seed, split, i): a deterministic stand-in for the grain loader."""

    def __init__(self, seed, split, seq_len, global_batch_size, process_index, process_count, num_epochs=None):
        self.seed, self.split, self.seq_len = seed, split, seq_len
        self.rows = global_batch_size // process_count
        self.offset = process_index * self.rows
        self.index = 0
        self.limit = 2 if num_epochs == 1 else None

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        rs = np.random.RandomState([self.seed, 0 if self.split == "train" else 1, self.index])
        self.index += 1
        full = rs.randint(1, VOCAB, (self.offset + self.rows, self.seq_len + 1))[self.offset:]
        segments = np.ones((self.rows, self.seq_len), np.int32)
        segments[:, self.seq_len // 2:] = 2
        positions = np.concatenate([np.arange(self.seq_len // 2), np.arange(self.seq_len - self.seq_len // 2)])
        weights = np.ones((self.rows, self.seq_len), np.float32)
        weights[:, self.seq_len // 2 - 1] = 0
        return {"tokens": full[:, :-1].astype(np.int32), "targets": full[:, 1:].astype(np.int32),
                "loss_weights": weights, "segment_ids": segments,
                "positions": np.broadcast_to(positions, (self.rows, self.seq_len)).astype(np.int32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def synthetic_task():
    def data(config, split, *, seq_len, global_batch_size, process_index=0, process_count=1, num_epochs=None):
        return SyntheticLoader(config.seed, split, seq_len, global_batch_size, process_index, process_count, num_epochs)

    return Task(loss_fn=next_token_loss, data=data, eval_bytes_per_token=lambda config: 3.0)


def small_config(**train):
    config = load_config("tiny")
    config.model.update(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    config.train.update(**{"steps": 4, "global_batch_size": 8, "seq_len": 32, **train})
    config.optim.update(lr=1e-2, warmup_steps=2)
    config.checkpoint.update(every_steps=2, async_save=False)
    config.eval.update(every_steps=0)
    config.log.update(every_steps=1, tensorboard=False, progress_bar=False, samples=())
    return config
