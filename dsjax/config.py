"""Run configuration: ml_collections ConfigDicts with sections model, data, optim, train, checkpoint, mesh, eval, log,
and one section per task that has keys of its own (`config.task` picks the task: pretrain, sft or dpo).

`default_config()` holds every key with its default; the files in `configs/` start from it and change what their run
needs. `load_config("tiny")` (a name in `configs/`) or `load_config("path/to/file.py")` imports the file, calls its
`get_config()`, locks the dict (so a misspelt key is an error, not a silent new field) and validates it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from pathlib import Path

from ml_collections import config_dict

from dsjax.errors import ConfigError
from dsjax.model.config import ModelConfig
from dsjax.sharding import DEFAULT_RULES, MESH_AXES, check_dcn_shape

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# The names config keys may take; the modules that implement them (dsjax/train/optimizer.py, dsjax/train/tasks/)
# import these, so validation needs nothing from the trainer.
SCHEDULES = ("multistep", "cosine", "wsd")
TASKS = ("pretrain", "sft", "dpo")
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
DPO_REFERENCES = ("precomputed", "model")


def _model_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict(dataclasses.asdict(ModelConfig()))


def _data_defaults() -> config_dict.ConfigDict:
    # Read by dsjax/data/pipeline.py (make_loader) and dsjax/data/corpus.py (the built-in corpus).
    return config_dict.ConfigDict(
        {
            # "builtin" (this Python's standard library sources, prepared on first use, no download) or
            # comma-separated directories made by `python -m dsjax.data.prepare`.
            "datasets": "builtin",
            # Comma-separated shares of training tokens, one per dataset; None: each in proportion to its size.
            "weights": config_dict.placeholder(str),
            # Tokenizer file (.model or tokenizer.json). For "builtin": used instead of training one; otherwise the
            # datasets must have been prepared with it. None: the tokenizer the datasets carry.
            "tokenizer": config_dict.placeholder(str),
            # Size of the BPE tokenizer trained for "builtin" (special and byte tokens included; pads to 4096).
            "builtin_vocab_size": 4000,
            # Share of the built-in corpus held out for validation (bits-per-byte).
            "builtin_val_fraction": 0.05,
            # Where "builtin" is prepared; None: $DSJAX_CACHE, else ~/.cache/dsjax.
            "cache_dir": config_dict.placeholder(str),
            # Shuffle seed; None: the top-level seed.
            "seed": config_dict.placeholder(int),
            # Threads that read and decode documents.
            "num_threads": 2,
        }
    )


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
            # multistep: after these fractions of the run, the lr drops to these fractions of the peak.
            "multistep_boundaries": (0.8, 0.9),
            "multistep_factors": (0.316, 0.1),
            # cosine and wsd: the final lr as a fraction of the peak; wsd: the share of steps spent decaying.
            "min_lr_ratio": 0.1,
            "decay_fraction": 0.2,
        }
    )


def _train_defaults() -> config_dict.ConfigDict:
    return config_dict.ConfigDict(
        {
            "steps": 1000,
            # Passes over the training data instead of `steps` (SFT, DPO): steps = epochs x batches per epoch.
            "epochs": config_dict.placeholder(int),
            # Sequences per optimizer step across all devices; None takes it from the scaling law B_opt.
            "global_batch_size": config_dict.placeholder(int),
            "seq_len": 4096,
            # Micro-batches per optimizer step (gradients summed in float32).
            "grad_accum_steps": 1,
            # Parameters that start a new run: a dsjax checkpoint or training workdir, or a Hugging Face model dir.
            "init_from": config_dict.placeholder(str),
        }
    )


def _checkpoint_defaults() -> config_dict.ConfigDict:
    # Save every N steps and every M minutes of wall clock (the paper: every 5 minutes); keep the newest `keep`.
    return config_dict.ConfigDict({"every_steps": 1000, "every_minutes": 5.0, "keep": 3, "async_save": True})


def _mesh_defaults() -> config_dict.ConfigDict:
    # Mesh shape over (data, fsdp, tensor); -1 takes the devices left over. `rules` map logical axis names to mesh
    # axes (see dsjax/sharding.py); zero1 splits the optimizer state over `data` as well. dcn_shape: how many TPU
    # slices (or hosts) each axis spans, e.g. (4, 1, 1) for data parallelism across 4 slices and everything else
    # inside one; the mesh is mesh.shape, each slice holding a block of shape // dcn_shape. None: one slice (or,
    # across several, all of them on the first axis they divide).
    return config_dict.ConfigDict({"shape": (-1, 1, 1), "axes": MESH_AXES, "rules": DEFAULT_RULES, "zero1": True,
                                   "dcn_shape": config_dict.placeholder(tuple)})


def _eval_defaults() -> config_dict.ConfigDict:
    # Evaluate every N steps on up to `steps` batches of the held-out split (0: the whole split). `tasks`: specs of
    # python -m dsjax.eval run at the same steps, separated by ";" (e.g. "bpb:a.txt,b.txt;mc:arc.jsonl"), logged as
    # eval/<task>/<metric>.
    return config_dict.ConfigDict({"every_steps": 500, "steps": 10, "batch_size": config_dict.placeholder(int),
                                   "tasks": ""})


def _sft_defaults() -> config_dict.ConfigDict:
    # Read by dsjax/train/tasks/sft.py (config.task = "sft").
    return config_dict.ConfigDict(
        {
            # Several conversations per row (segment ids keep them apart) or one per row, padded.
            "packing": True,
            # Greedy answers to at most this many held-out prompts measure the repetition ratio (0: off).
            "repetition_prompts": 64,
            # Held-out (prompt, answer) pairs scored by greedy exact match, when the data has answers (0: off).
            "exact_match_examples": 200,
            # Tokens generated per answer for both measurements.
            "max_new_tokens": 64,
            # Also measure both at every evaluation, not only before and after training.
            "generate_at_eval": False,
        }
    )


def _dpo_defaults() -> config_dict.ConfigDict:
    # Read by dsjax/train/tasks/dpo.py (config.task = "dpo"); names and definitions as in TRL.
    return config_dict.ConfigDict(
        {
            "beta": 0.1,
            # sigmoid (the paper's DPO), robust (label smoothing), ipo, hinge.
            "loss": "sigmoid",
            "label_smoothing": 0.0,
            # Adds this weight times the chosen responses' token-mean NLL (RPO); 0: off.
            "sft_weight": 0.0,
            # precomputed: reference log-probs in one pass before training, stored beside the run;
            # model: a frozen copy of the reference in the train state.
            "reference": "precomputed",
            # The reference model; None: train.init_from.
            "reference_from": config_dict.placeholder(str),
            "packing": True,
            # Greedy exact match on held-out problems before and after training (data.datasets=synthetic only;
            # 0: off), with this many new tokens per answer; scored as in SFT.
            "exact_match_examples": 0,
            "max_new_tokens": 64,
            # data.datasets=synthetic (the offline demo, dpo_synthetic.py): pairs from this many training and
            # held-out problems, each answered `synthetic_samples` times by the SFT model at this temperature
            # (up to max_new_tokens each).
            "synthetic_prompts": 3000,
            "synthetic_val_prompts": 300,
            "synthetic_samples": 8,
            "synthetic_temperature": 1.0,
        }
    )


def _log_defaults() -> config_dict.ConfigDict:
    # peak_flops_per_device: for MFU; None looks the device up in dsjax.train.metrics.PEAK_FLOPS.
    # samples: prompts completed at the end of training (sample_tokens new tokens each).
    return config_dict.ConfigDict(
        {
            "every_steps": 10,
            "tensorboard": True,
            "progress_bar": True,
            "peak_flops_per_device": config_dict.placeholder(float),
            "samples": ("def ", "import ", "class "),
            "sample_tokens": 48,
            # Sampled with this temperature and top-k from `seed` (nanoGPT's habit; 0: greedy, which a small model
            # turns into loops).
            "sample_temperature": 0.8,
            "sample_top_k": 40,
        }
    )


def default_config() -> config_dict.ConfigDict:
    """Every key a run can set, with its default."""
    config = config_dict.ConfigDict()
    config.name = "default"
    config.seed = 0
    # What is trained: pretrain (next-token prediction on data.datasets), sft (assistant tokens of conversations),
    # dpo (preference pairs against a reference model). Each task's own keys are in its section below.
    config.task = "pretrain"
    config.model = _model_defaults()
    config.data = _data_defaults()
    config.optim = _optim_defaults()
    config.train = _train_defaults()
    config.checkpoint = _checkpoint_defaults()
    config.mesh = _mesh_defaults()
    config.eval = _eval_defaults()
    config.log = _log_defaults()
    config.sft = _sft_defaults()
    config.dpo = _dpo_defaults()
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


def with_model(config: config_dict.ConfigDict, name: str) -> config_dict.ConfigDict:
    """`config` with the model and mesh of the named config: how 67b_sft and 67b_dpo reuse the 7B recipes."""
    base = load_config(name)
    config.model.update(base.model.to_dict())
    config.mesh.update(base.mesh.to_dict())
    return config


def validate(config: config_dict.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field. Sections grow their checks as their issues land."""
    model_config(config)


def validate_train(config: config_dict.ConfigDict) -> None:
    """Checks the keys the trainer reads; the mesh-dependent batch checks happen once the mesh exists."""
    validate(config)
    if config.task not in TASKS:
        close = difflib.get_close_matches(str(config.task), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task={config.task!r} is not one of {', '.join(TASKS)}{hint}.")

    def positive(key, allow_zero=False, allow_none=False):
        section, name = key.split(".")
        value = config[section][name]
        if value is None and allow_none:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise ConfigError(f"{key} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}.")

    for key in ("train.steps", "train.seq_len", "train.grad_accum_steps", "checkpoint.every_steps",
                "checkpoint.keep", "log.every_steps"):
        positive(key)
    for key in ("optim.warmup_steps", "eval.every_steps", "eval.steps", "checkpoint.every_minutes",
                "optim.weight_decay", "log.sample_temperature", "log.sample_top_k"):
        positive(key, allow_zero=True)
    for key in ("optim.lr", "train.global_batch_size", "eval.batch_size", "train.epochs"):
        positive(key, allow_none=True)
    if config.task == "sft":
        for key in ("sft.repetition_prompts", "sft.exact_match_examples"):
            positive(key, allow_zero=True)
        positive("sft.max_new_tokens")
    if config.task == "dpo":
        positive("dpo.beta")
        positive("dpo.sft_weight", allow_zero=True)
        for key in ("dpo.exact_match_examples", "dpo.synthetic_temperature"):
            positive(key, allow_zero=True)
        for key in ("dpo.max_new_tokens", "dpo.synthetic_prompts", "dpo.synthetic_val_prompts",
                    "dpo.synthetic_samples"):
            positive(key)
        for key, names in (("loss", DPO_LOSSES), ("reference", DPO_REFERENCES)):
            if config.dpo[key] not in names:
                close = difflib.get_close_matches(str(config.dpo[key]), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"dpo.{key}={config.dpo[key]!r} is not one of {', '.join(names)}{hint}.")
        if not 0 <= config.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {config.dpo.label_smoothing!r}.")
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={config.train.seq_len} exceeds the model's context, model.max_seq_len="
            f"{config.model.max_seq_len}."
        )
    if config.mesh.dcn_shape is not None:
        check_dcn_shape(config.mesh.dcn_shape, len(config.mesh.axes))
    if config.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={config.optim.schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if len(config.optim.multistep_boundaries) != len(config.optim.multistep_factors):
        raise ConfigError("optim.multistep_boundaries and optim.multistep_factors must have the same length.")


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
    return ModelConfig.from_config(config.model)
