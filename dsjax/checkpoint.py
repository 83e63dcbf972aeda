"""Params-only checkpoints: what the trainer, `convert`, generation and evaluation share, without the trainer.

Layout: `ROOT/<step>/params` holds the parameters as a plain nested dict of arrays (Orbax StandardSave, restored
straight onto any mesh), `ROOT/<step>/meta` a JSON dict with at least `model_config` (and, from training runs, the
`tokenizer` the model was trained with). A training workdir keeps its checkpoints in `WORKDIR/checkpoints`, with
the optimizer state beside the params; `python -m dsjax.convert import-hf` writes a ROOT with step 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsjax.errors import CheckpointNotFound
from dsjax.model import ModelConfig, Transformer, abstract_model

# ModelConfig fields that change no parameter shape: a restore may override them (attention backend, remat, ...).
RUNTIME_FIELDS = ("attention", "remat", "dtype", "param_dtype")


def params_dict(model: Transformer) -> dict:
    """The model's parameters as a nested dict of arrays (what `params` stores)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(model: Transformer, root, *, step: int = 0, meta: dict | None = None, overwrite: bool = False):
    """Writes a params-only checkpoint (e.g. an imported Hugging Face model) as step `step` under `root`.

    Collective: in a multi-host run every process calls it (Orbax writes each array's shards from their owner).
    """
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
    """(manager root, step) for a workdir, a checkpoint root (its newest complete step) or one step directory."""
    path = Path(path).expanduser().absolute()
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


def checkpoint_config(path, **overrides) -> ModelConfig:
    """The ModelConfig of the model at `path` (a dsjax checkpoint or a Hugging Face directory), with runtime fields
    overridden; reads no weights, so shardings can be planned before loading."""
    if is_hf_dir(path):
        import json

        from dsjax.interop import hf

        config_path = Path(path).expanduser() / "config.json"
        return hf.config_from_hf(json.loads(config_path.read_text()), str(config_path), **overrides)
    root, step = find_checkpoint(path)
    return ModelConfig(**{**read_meta(root, step)["model_config"], **overrides})


def restore_model(path, *, shardings=None, **overrides) -> Transformer:
    """Rebuilds the Transformer stored at `path` (see `find_checkpoint`).

    overrides: RUNTIME_FIELDS of ModelConfig (attention, remat, dtype, param_dtype).
    shardings: optional pytree matching `params_dict` of jax Shardings; default: the first device.
    """
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise TypeError(f"restore_model cannot override {unknown[0]!r}: it changes parameter shapes.")
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


def checkpoint_meta(path) -> dict:
    """The `meta` item of the checkpoint at `path` (model config, step, tokenizer if recorded)."""
    return read_meta(*find_checkpoint(path))


# --------------------------------------------------------------------------------------- any model a user points at

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_hf_dir(path) -> bool:
    """A Hugging Face model directory: config.json beside safetensors weights."""
    path = Path(path).expanduser()
    return (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


def load_model(path, *, shardings=None, **overrides) -> Transformer:
    """The model at `path`: a dsjax checkpoint (workdir, root or step directory) or a Hugging Face model directory.

    Generation, evaluation and `train.init_from` all accept either, so a user never needs a convert step first.
    shardings: a pytree like `params_dict` (dsjax) of Shardings, placing each parameter as it is read.
    """
    if is_hf_dir(path):
        from dsjax.interop import hf

        flat = None
        if shardings is not None:
            flat = {tuple(str(k.key) for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        kw = dict(overrides)
        param_dtype, compute_dtype = kw.pop("param_dtype", None), kw.pop("dtype", None)
        return hf.load_model(path, param_dtype, shardings=flat, compute_dtype=compute_dtype, **kw)
    return restore_model(path, shardings=shardings, **overrides)


def find_tokenizer(path) -> Path | None:
    """The tokenizer file that goes with the model at `path`, or None.

    Looked for, in order: beside a Hugging Face model; in the directory given and the ones above it up to the
    workdir (the trainer copies its tokenizer into WORKDIR); the file recorded in the checkpoint's meta.
    """
    path = Path(path).expanduser().absolute()
    candidates = [path]
    if not is_hf_dir(path):
        try:
            root, step = find_checkpoint(path)
        except CheckpointNotFound:
            root, step = None, None
        if root is not None:
            candidates += [root / str(step), root, root.parent]
    for directory in candidates:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                return directory / name
    if not is_hf_dir(path) and root is not None:
        recorded = read_meta(root, step).get("tokenizer", {}).get("file")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
    return None
