"""python -m dsjax.main --config=NAME [--config.section.key=value ...] [--workdir=DIR] [--restart] [--profile]

NAME is a file in configs/ or a path to a config .py file; with no flags it trains `tiny` on the built-in corpus.
The config's `task` key says what is trained: pretrain, sft or dpo (tiny -> tiny_sft is the offline walkthrough,
then python -m dsjax.chat). The workdir (default runs/NAME) holds checkpoints, metrics.jsonl, TensorBoard events,
the resolved config.json and the tokenizer; running the same command again resumes from its newest checkpoint.

Exit codes: 0 done; 1 the loss went non-finite; 2 a mistake in the config, data or workdir (one sentence on
stderr, nothing written); 128 + the signal (143 for SIGTERM, 130 for Ctrl-C) when stopped by a signal after saving a
checkpoint the same command resumes from.
"""

from __future__ import annotations

import difflib
import sys

from absl import flags
from ml_collections import config_flags

from dsjax.config import CONFIG_DIR, load_config, resolve_config_path
from dsjax.errors import CheckpointError, CheckpointNotFound, ConfigError, DataError

FLAGS_HELP = (
    ("--config=NAME", "a config in configs/ or a path to a .py file defining get_config() (default: tiny)"),
    ("--config.SECTION.KEY=VALUE", "override any key, e.g. --config.train.steps=100 --config.optim.lr=1e-3"),
    ("--workdir=DIR", "where the run lives (default runs/NAME); the same command resumes from it"),
    ("--restart", "start the run in DIR over from step 0, moving its old checkpoints and metrics aside"),
    ("--plan=TARGET", "compile the step for v5p-128, v5e-256, v4-128, v6e-256, h100x8, h200x8, h100x64, ... on "
                      "this CPU: memory per device, FLOPs, predicted speed (exit 3: does not fit)"),
    ("--plan_search", "with --plan: try meshes, remat policies and grad_accum, rank those that fit"),
    ("--plan_json=FILE", "with --plan: also write the plan as JSON"),
    ("--plan_mfu=F", "with --plan: the MFU the predicted step time assumes (default 0.4)"),
    ("--plan_device_memory=GIB", "with --plan: memory per device instead of the target's datasheet figure"),
    ("--profile", "record a jax.profiler trace of steps 3-6 into WORKDIR/profile"),
    ("--distributed", "multi-process: jax.distributed.initialize() detects TPU pods, SLURM, Open MPI"),
    ("--coordinator_address=ADDR", "with --distributed, off those clusters: process 0's HOST:PORT, on every process"),
    ("--num_processes=N", "with --distributed, off those clusters: how many processes"),
    ("--process_id=I", "with --distributed, off those clusters: this process's index, 0 to N-1"),
    ("-h, --help", "this help"),
)


def usage() -> str:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    flags_text = "\n".join(f"  {flag:<30} {text}" for flag, text in FLAGS_HELP)
    return (f"{__doc__.strip()}\n\nflags:\n{flags_text}\n\nnamed configs: {', '.join(names)} (in {CONFIG_DIR})\n"
            "every config key, with its default and a comment: dsjax/config.py; the keys scripts rely on: README.md, "
            "section Training.\n")


def _config_path(argv: list[str]) -> tuple[list[str], str]:
    """Rewrites --config=NAME to the file's path (config_flags wants a path); default tiny."""
    name = "tiny"
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg == "--config":
            name = next(args, name)
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            out.append(arg)
    path = str(resolve_config_path(name))
    return out[:1] + [f"--config={path}"] + out[1:], name


def _check_override_keys(argv: list[str], config) -> None:
    """One sentence for a misspelt --config.a.b key (config_flags alone raises a traceback)."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                options = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean {'.'.join(walked + close)}?)" if close else ""
                where = ".".join(walked) or "the config"
                raise ConfigError(f"--config.{key}: {where} has no key {part!r}{hint}.")
            node = node[part]
            walked.append(part)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("-h", "--help", "-help", "--helpfull", "--helpshort") for arg in argv[1:]):
        print(usage())
        return 0
    try:
        argv, name = _config_path(argv)
        _check_override_keys(argv, load_config(name))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "run config: a name in configs/ or a .py path", flag_values=fv)
    flags.DEFINE_string("workdir", None, "run directory (default runs/NAME)", flag_values=fv)
    flags.DEFINE_bool("profile", False, "record a jax.profiler trace of a few steps into WORKDIR/profile",
                      flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "--distributed: process 0's HOST:PORT", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "--distributed: this process's index", flag_values=fv)
    flags.DEFINE_bool("restart", False, "start over from step 0, moving old checkpoints aside", flag_values=fv)
    flags.DEFINE_string("plan", None, "compile the train step for a target and report (dsjax/train/plan.py)",
                        flag_values=fv)
    flags.DEFINE_bool("plan_search", False, "with --plan: search meshes, remat and grad_accum", flag_values=fv)
    flags.DEFINE_string("plan_json", None, "with --plan: write the plan as JSON to this file", flag_values=fv)
    flags.DEFINE_float("plan_mfu", 0.4, "with --plan: assumed MFU for the predicted step time", flag_values=fv)
    flags.DEFINE_float("plan_device_memory", None, "with --plan: GiB per device (default: the target's)",
                       flag_values=fv)
    saved_argv, sys.argv = sys.argv, argv  # config_flags discovers --config.* overrides from sys.argv
    try:
        fv(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv

    if fv.plan:  # compile for a target and stop: nothing trained, nothing written but --plan_json
        from dsjax.train.plan import cli

        return cli(fv.config, fv.plan, json_path=fv.plan_json, search=fv.plan_search, mfu=fv.plan_mfu,
                   device_memory_gib=fv.plan_device_memory)
    import jax

    from dsjax.config import validate
    from dsjax.train.trainer import NonFiniteError, train

    from dsjax import distributed

    try:
        distributed.check_flags(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
        if fv.distributed:
            distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = fv.config
    try:
        validate(config)
        result = train(config, fv.workdir or f"runs/{config.name}", restart=fv.restart, profile=fv.profile)
    except (ConfigError, DataError, CheckpointError, CheckpointNotFound, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop takes over Ctrl-C (preparing data, compiling): nothing to save yet
        print("interrupted before training started; nothing was saved beyond what the workdir already held.",
              file=sys.stderr)
        return 130
    if jax.process_index() != 0:  # one summary per job, from process 0, like the trainer's own log lines
        return 128 + int(result["preempted"]) if result.get("preempted") else 0
    if result.get("preempted"):
        signum = result["preempted"]
        print(f"stopped by {signum.name} at step {result['step']} (preempted): the checkpoint is saved and the same "
              f"command resumes from it; exit code {128 + int(signum)}.")
        return 128 + int(signum)
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "step" and isinstance(v, float))
    print(f"done: step {result.get('step')}" + (f", {numbers}" if numbers else " (the run was already complete)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
