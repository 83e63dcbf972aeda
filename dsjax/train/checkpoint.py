"""dsjax checkpoints (Orbax): one step directory per save, items `params` and `meta`.

Layout: `ROOT/<step>/params` holds the parameters as a plain nested dict of arrays (Orbax StandardSave, restored
straight onto any mesh), `ROOT/<step>/meta` a JSON dict with at least `model_config`. A training workdir keeps its
checkpoints in `WORKDIR/checkpoints`. `python -m dsjax.convert import-hf` writes a ROOT with step 0, which the
trainer can start or fine-tune from.
"""

from __future__ import annotations

import dataclasses
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
