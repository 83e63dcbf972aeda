"""Tasks the trainer can run, by `config.task`; see base.py for what a task supplies."""

from __future__ import annotations

import importlib

from dsjax.config import TASKS
from dsjax.train.tasks.base import Frozen, Task

# config.task -> "module:class"; dsjax.config.TASKS lists the same names for validation.
REGISTRY = {
    "pretrain": "dsjax.train.tasks.pretrain:PretrainTask",
    "sft": "dsjax.train.tasks.sft:SFTTask",
    "dpo": "dsjax.train.tasks.dpo:DPOTask",
}
assert tuple(REGISTRY) == TASKS, "dsjax.config.TASKS and the task registry disagree"


def task_class(name: str) -> type[Task]:
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Frozen", "REGISTRY", "Task", "task_class"]
