"""Shared helpers for trainer tests: a small config and a synthetic, resumable data task."""

import numpy as np

from dsjax.config import load_config
from dsjax.train.loss import next_token_loss
from dsjax.train.tasks import Task

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


class SyntheticTask(Task):
    """Next-token loss on SyntheticLoader batches; bits-per-byte as if every token were 3 bytes."""

    name = "synthetic"
    loader = SyntheticLoader

    def _data(self, split, num_epochs, global_batch_size, process_index, process_count):
        return self.loader(self.config.seed, split, self.config.train.seq_len, global_batch_size, process_index,
                           process_count, num_epochs)

    def train_data(self, *, global_batch_size, process_index, process_count):
        return self._data("train", None, global_batch_size, process_index, process_count)

    def val_data(self, *, global_batch_size, process_index, process_count):
        return self._data("val", 1, global_batch_size, process_index, process_count)

    def loss(self, model, batch, frozen):
        loss_sum, weight_sum = next_token_loss(model, batch)
        return loss_sum, weight_sum, {}

    def summarize(self, means, prefix):
        out = super().summarize(means, prefix)
        if prefix == "eval_":
            out["eval_bpb"] = means["loss"] / np.log(2) / 3.0
        return out


def synthetic_task():
    return SyntheticTask


def small_config(**train):
    config = load_config("tiny")
    config.model.update(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    config.train.update(**{"steps": 4, "global_batch_size": 8, "seq_len": 32, **train})
    config.optim.update(lr=1e-2, warmup_steps=2)
    config.checkpoint.update(every_steps=2, async_save=False)
    config.eval.update(every_steps=0)
    config.log.update(every_steps=1, tensorboard=False, progress_bar=False, samples=())
    return config
