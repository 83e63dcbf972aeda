"""What a task is: the part of a run that differs between pretraining, SFT and DPO.

The trainer (dsjax/train/trainer.py) owns the steps, logging, evaluation cadence, checkpoints, signals and
profiling; a task owns its data, its loss, any frozen state the loss reads, and what it reports at the end. A new
kind of training is a new file in this package plus a name in `dsjax.config.TASKS`, not an edit to the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax

from dsjax.errors import ConfigError


@dataclasses.dataclass
class Frozen:
    """State the loss reads but never trains (e.g. DPO's reference model): no gradients, no optimizer state.

    abstract: a pytree of jax.ShapeDtypeStruct; axes: the same pytree with a tuple of logical axis names per leaf
    (None: replicated), mapped to the mesh by the config's rules like the params'. load(shardings) returns the
    arrays, placed on those shardings; the trainer calls it for a fresh run, and on resume too when `save` is False
    (a reference model restored from its own checkpoint need not be written again with every step).
    """

    abstract: Any
    axes: Any
    load: Callable[[Any], Any]
    save: bool = True


class Task:
    """Base class; subclasses override what they need. `self.config` is the run's resolved config.

    Data iterators yield dicts of numpy arrays with this process's rows of the global batch and have
    get_state()/set_state() (JSON-serializable), which go into every checkpoint so a resumed run sees the same
    batches. The validation iterator is built once and rewound to its start for every evaluation.
    """

    name = "task"

    def __init__(self, config):
        self.config = config

    def batches_per_epoch(self, global_batch_size: int) -> int:
        """Global batches in one pass over the training data, for `train.epochs`."""
        raise ConfigError(f"task {self.name} does not support train.epochs; set train.steps instead.")

    def setup(self, *, mesh, rules, batch_sharding, workdir, log: Callable[[str], None]) -> None:
        """Runs once in `Trainer.run`, on every process, before the data iterators are built and before anything
        is written: the place for work over the whole dataset (DPO's reference log-probs)."""

    def train_data(self, *, global_batch_size: int, process_index: int, process_count: int) -> Iterator[dict]:
        raise NotImplementedError(f"task {self.name} must supply train_data")

    def val_data(self, *, global_batch_size: int, process_index: int, process_count: int) -> Iterator[dict] | None:
        """A finite iterator over the held-out split, or None when the task has none."""
        return None

    def loss(self, model, batch: dict, frozen) -> tuple[jax.Array, jax.Array, dict]:
        """(loss_sum, weight_sum, aux): sums over the batch; the trainer divides by the global weight_sum."""
        raise NotImplementedError(f"task {self.name} must supply loss")

    def frozen(self, model_cfg) -> Frozen | None:
        return None

    def summarize(self, means: dict, prefix: str) -> dict:
        """Metrics to log from the weight-normalized sums (`loss`, aux entries); prefix is "" or "eval_"."""
        return {prefix + k: v for k, v in means.items()}

    def tokenizer(self):
        """The run's tokenizer (copied into the workdir, used for samples), or None."""
        return None

    def on_eval(self, model, step: int, log: Callable[[str], None]) -> dict:
        """Runs after each held-out evaluation (step 0 included), on every process; returns metrics to log."""
        return {}

    def report(self, model, mesh, log: Callable[[str], None]) -> dict:
        """Runs at the end of training on every process (a computation on global arrays needs all of them);
        prints through `log` (process 0 only) and returns metrics to record."""
        return {}
