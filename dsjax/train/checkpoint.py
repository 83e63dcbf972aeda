"""dsjax checkpoints (Orbax): one step directory per save, items `params` and `meta`.

Layout: `ROOT/<step>/params` holds the parameters as a plain nested dict of arrays (Orbax StandardSave, restored
straight onto any mesh), `ROOT/<step>/meta` a JSON dict with at least `model_config`. A training workdir keeps its
checkpoints in `WORKDIR/checkpoints`. `python -m dsjax.convert import-hf` writes a ROOT with step 0, which the
trainer can start or fine-tune from.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsjax.model import ModelConfig, Transformer, abstract_model


class CheckpointNotFound(FileNotFoundError):
    """The given path holds no complete dsjax checkpoint."""


def params_dict(model: Transformer) -> dict:
    """The model's parameters as a nested dict of arrays (what `params` stores)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_model(model: Transformer, root, *, step: int = 0, meta: dict | None = None, overwrite: bool = False):
    """Writes a params-only checkpoint (e.g. an imported Hugging Face model) as step `step` under `root`."""
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} already exists and is not empty; pass --overwrite to replace it.")
    meta = dict(meta or {}, model_config=dataclasses.asdict(model.config), step=step)
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params_dict(model)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        manager.wait_until_finished()
    return root / str(step)


def find_checkpoint(path) -> tuple[Path, int]:
    """(manager root, step) for a workdir, a checkpoint root (newest complete step) or one step directory."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist.")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "params").is_dir():
        return path.parent, int(path.name)
    steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
    if not steps:
        raise CheckpointNotFound(f"{path} holds no complete dsjax checkpoint (expected <step>/params and <step>/meta).")
    return path, max(steps)


def read_meta(root: Path, step: int) -> dict:
    with ocp.CheckpointManager(root) as manager:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def restore_model(path, *, shardings=None, **overrides) -> Transformer:
    """Rebuilds the Transformer stored at `path` (see `find_checkpoint`).

    overrides: ModelConfig fields that do not change shapes (attention, remat, dtype, param_dtype).
    shardings: optional pytree matching `params_dict` of jax Shardings; default: the first device.
    """
    root, step = find_checkpoint(path)
    meta = read_meta(root, step)
    cfg = ModelConfig(**{**meta["model_config"], **overrides})
    graphdef, state = nnx.split(abstract_model(cfg))
    abstract = nnx.to_pure_dict(state)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(state, restored.params)
    return nnx.merge(graphdef, state)


class TrainCheckpointer:
    """Saves and restores the whole train state in `WORKDIR/checkpoints`, asynchronously.

    Items per step: `params` and `opt_state` (Orbax StandardSave, restorable onto another mesh), `meta` (JSON: step,
    model config, RNG key, the data iterator state). Orbax writes each step to a temporary directory and renames it
    when complete, so a crash mid-save never leaves a step that looks complete; the newest `keep` steps are kept.
    """

    def __init__(self, workdir, keep: int, async_save: bool = True):
        self.root = (Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.root, options=options)

    def save(self, step: int, state: dict, meta: dict):
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(dict(meta, step=int(step))),
        )
        self.manager.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, target: dict, log=print):
        """(state, meta) from the newest step that restores, or None when there is no checkpoint at all.

        A step that fails (truncated, corrupt) is reported and the one before it tried; if checkpoints exist but none
        restores, this raises rather than let training silently start from scratch.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target["params"]),
                    opt_state=ocp.args.StandardRestore(target["opt_state"]),
                    meta=ocp.args.JsonRestore(),
                ))
            except Exception as err:  # noqa: BLE001 - any failure to read a step means: try the previous one
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                aside = self._move_aside(step)
                log(f"checkpoint {self.root / str(step)} failed to restore ({type(err).__name__}: {first_line[:200]}); "
                    f"moved it to {aside} and trying the previous one")
                continue
            meta = dict(restored.meta)
            state = {"params": restored.params, "opt_state": restored.opt_state,
                     "step": jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32),
                                            target["step"].sharding)}
            return state, meta
        if steps:
            raise RuntimeError(f"checkpoints {steps} exist in {self.root} but none restores; refusing to start from "
                               "scratch (move them away to start over).")
        return None

    def _move_aside(self, step: int) -> Path:
        """Keeps a step that failed to restore for inspection, out of the manager's way (a later save reuses its
        number)."""
        aside = self.root.parent / "checkpoints_failed" / f"{step}-{int(time.time())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / str(step), aside)
        self.manager.reload()
        return aside

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
