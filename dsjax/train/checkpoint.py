"""Train-state checkpoints (Orbax, asynchronous) in `WORKDIR/checkpoints`; params-only ones are dsjax/checkpoint.py.

Items per step: `params`, `opt_state` and, when the task says so, `frozen` (Orbax StandardSave, restorable onto
another mesh), and `meta` (JSON: step, model config, RNG key, the data iterator state, the tokenizer). The `params`
and `meta` items are laid out as dsjax/checkpoint.py reads them, so export, generation and evaluation open a training
workdir without the trainer. Orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never leaves a step that looks complete; the newest `keep` steps are kept.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dsjax.errors import CheckpointError

FAILED = "checkpoints_failed"


def barrier(name: str) -> None:
    """Waits for every process (a no-op on one host): where the others depend on process 0's files."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def failure_detail(err: BaseException) -> str:
    """The most specific line an exception chain offers (TensorStore's own message, not a wrapper's repr)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for candidate in reversed(chain):  # innermost first: that is where the file was actually read
        if isinstance(candidate, StopIteration):
            continue
        for line in str(candidate).strip().splitlines():
            line = re.sub(r"<bound method .*", "", line).strip()  # TensorStore's wrapper prints a method's repr
            if len(line) > 8:
                return f"{type(candidate).__name__}: {line[:300]}"
    return type(chain[0]).__name__


class TrainCheckpointer:
    """Saves and restores the whole train state. Every process calls every method (Orbax saves are collective);
    moving a bad step aside happens on process 0 only, the others wait for it."""

    def __init__(self, workdir, keep: int, async_save: bool = True):
        self.root = (Path(workdir) / "checkpoints").absolute()
        self.failed = self.root.parent / FAILED
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.root, options=options)

    def save(self, step: int, state: dict, meta: dict, *, save_frozen: bool = True):
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "opt_state": ocp.args.StandardSave(state["opt_state"]),
                 "meta": ocp.args.JsonSave(dict(meta, step=int(step)))}
        if "frozen" in state and save_frozen:
            items["frozen"] = ocp.args.StandardSave(state["frozen"])
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, target: dict, *, restore_frozen: bool = True, log=print):
        """(state, meta) from the newest step that restores, or None when there never was a checkpoint.

        A step that fails (truncated, corrupt) is reported, moved to WORKDIR/checkpoints_failed, and the one before
        it tried. If none restores (now, or in an earlier attempt that moved them all aside), this raises
        CheckpointError rather than let the run silently start from scratch; `--restart` is the way to do that.
        """
        steps = self.steps()
        for step in reversed(steps):
            items = {"params": ocp.args.StandardRestore(target["params"]),
                     "opt_state": ocp.args.StandardRestore(target["opt_state"]), "meta": ocp.args.JsonRestore()}
            if "frozen" in target and restore_frozen:
                items["frozen"] = ocp.args.StandardRestore(target["frozen"])
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # noqa: BLE001 - any failure to read a step means: try the previous one
                aside = self._move_aside(step)
                log(f"checkpoint {self.root / str(step)} failed to restore ({failure_detail(err)}); moved it to "
                    f"{aside} and trying the previous one")
                continue
            meta = dict(restored.meta)
            state = {"params": restored.params, "opt_state": restored.opt_state,
                     "step": jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32),
                                            target["step"].sharding)}
            if "frozen" in items:
                state["frozen"] = restored.frozen
            return state, meta
        if steps or (self.failed.is_dir() and any(self.failed.iterdir())):
            raise CheckpointError(
                f"no checkpoint in {self.root} restores (the ones that failed are in {self.failed}); pass --restart "
                "to start this run over from step 0 (the old files are kept), or use another --workdir."
            )
        return None

    def _move_aside(self, step: int) -> Path:
        """Keeps a step that failed to restore for inspection, out of the manager's way (a later save reuses its
        number)."""
        aside = self.failed / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / str(step), aside)
        barrier(f"dsjax-move-aside-{step}")
        self.manager.reload()
        return aside

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def move_previous_run(workdir: Path) -> Path | None:
    """--restart: the old run's checkpoints, failed checkpoints and metrics go to WORKDIR/previous-<time>/ (process
    0), so the new run starts from step 0 and nothing is deleted."""
    workdir = Path(workdir)
    names = [n for n in ("checkpoints", FAILED, "metrics.jsonl", "tensorboard") if (workdir / n).exists()]
    if not names:
        return None
    target = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(workdir / name, target / name)
    barrier("dsjax-restart")
    return target
