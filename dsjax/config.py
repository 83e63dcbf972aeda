"""Run configuration: ml_collections ConfigDicts with sections model, data, optim, train, checkpoint, mesh, eval, log.

`default_config()` holds every key with its default; the files in `configs/` start from it and change what their run
needs. `load_config("tiny")` (a name in `configs/`) or `load_config("path/to/file.py")` imports the file, calls its
`get_config()`, locks the dict (so a misspelt key is an error, not a silent new field) and validates it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from ml_collections import config_dict

from dsjax.model.config import ConfigError, ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _model_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict(dataclasses.asdict(ModelConfig()))


def _data_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({})


def _optim_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict(
        {
            # Peak learning rate; None takes it from the scaling law lr_opt = 0.3118 * C^-0.1250.
            "lr": config_dict.placeholder(float),
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.1,
            "grad_clip_norm": 1.0,
            # multistep (the paper's), cosine, or wsd (warmup-stable-decay).
            "schedule": "multistep",
            "warmup_steps": 2000,
        }
    )


def _train_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict(
        {
            "steps": 1000,
            # Sequences per optimizer step across all devices; None takes it from the scaling law B_opt.
            "global_batch_size": config_dict.placeholder(int),
            "seq_len": 4096,
            "grad_accum_steps": 1,
        }
    )


def _checkpoint_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({"every_steps": 1000, "every_minutes": 5.0, "keep": 3})


def _mesh_defaults() -> config_dict.ConfigDict:
    # Mesh shape over (data, fsdp, tensor); -1 takes the devices left over.
    return config_dict.ConfigDict({"shape": (-1, 1, 1), "axes": ("data", "fsdp", "tensor")})


def _eval_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({"every_steps": 500, "steps": 10})


def _log_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({"every_steps": 10, "tensorboard": True})


def default_config() -> config_dict.ConfigDict:
    """Every key a run can set, with its default."""
    config = config_dict.ConfigDict()
    config.name = "default"
    config.seed = 0
    config.model = _model_defaults()
    config.data = _data_defaults()
    config.optim = _optim_defaults()
    config.train = _train_defaults()
    config.checkpoint = _checkpoint_defaults()
    config.mesh = _mesh_defaults()
    config.eval = _eval_defaults()
    config.log = _log_defaults()
    return config


def resolve_config_path(name_or_path: str) -> Path:
    """`tiny` -> configs/tiny.py; an existing path is used as given."""
    path = Path(name_or_path)
    if path.suffix == ".py" and path.exists():
        return path.resolve()
    candidate = CONFIG_DIR / f"{name_or_path}.py"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"--config={name_or_path!r} is neither a file nor one of the named configs: {', '.join(known)}.")


def load_config(name_or_path: str) -> config_dict.ConfigDict:
    """Imports a config file, calls its get_config(), locks and validates the result."""
    path = resolve_config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"dsjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function.")
    config = module.get_config()
    config.lock()
    validate(config)
    return config


def validate(config: config_dict.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field. Sections grow their checks as their issues land."""
    model_config(config)


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
    return ModelConfig.from_config(config.model)
