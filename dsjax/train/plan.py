"""`--plan=TARGET`: the run's real train step, compiled ahead of time for a target's devices, on this host.

Before renting a pod, a user wants to know whether a config fits and how fast it would go. The step compiled here
is the one the trainer runs (`step.jit_train_step`: same function, shardings from the same rules, the state
donated), lowered with `jax.ShapeDtypeStruct` inputs that carry the target's shardings, so nothing is allocated and
no accelerator is needed. Bytes per device are the compiled executable's own `memory_analysis()`: total = arguments
+ temporaries + outputs - aliased outputs (the donated state is updated in place). The arguments are split into
parameters, optimizer state and batch from the shardings (on CPU their sum is the argument size exactly; a TPU
pads to its tiles). A TPU compile may stop with RESOURCE_EXHAUSTED, a GPU compile never does (XLA only warns), so
the total is always compared with the device's memory as well.

Speed is a prediction, not a measurement: our FLOP formula (dsjax/train/metrics.py, the one MFU uses in training)
times the tokens per step, plus the matmuls the remat policy recomputes, over devices x peak x an assumed MFU
(`--plan_mfu`, default 40%); communication is not modelled. XLA's cost analysis counts each scan body (the layers,
the accumulation loop) once, so it is checked against our formula for what it counts: one layer of one micro-batch
plus the output head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import numpy as np

from dsjax import scaling
from dsjax import sharding as shd
from dsjax.config import model_config, validate_train
from dsjax.data.packing import empty_row
from dsjax.errors import ConfigError
from dsjax.model import ModelConfig
from dsjax.train import memory, metrics
from dsjax.train.optimizer import make_optimizer, make_schedule
from dsjax.train.resolve import resolve
from dsjax.train.state import abstract_state, graphdef_of, state_shardings
from dsjax.train.step import jit_train_step
from dsjax.train.targets import Target

GiB = 2**30
DEFAULT_MFU = 0.4
NOT_FIT_EXIT = 3  # a plan that does not fit (2 stays "a mistake in the config")


class DoesNotFit(RuntimeError):
    """The step needs more memory per device than the target has; the message is one sentence with the numbers."""


@dataclasses.dataclass
class PlanResult:
    record: dict  # the JSON report (keys listed in `to_json`)
    fits: bool


def _check_mesh(shape, n_devices: int, target: Target) -> None:
    """A plan uses all of the target's devices: a mesh for fewer (or more) is a mistake, named in one sentence."""
    fixed = math.prod(s for s in shape if s != -1)
    ok = fixed > 0 and ((n_devices % fixed == 0) if -1 in shape else fixed == n_devices)
    if not ok:
        raise ConfigError(f"mesh.shape={tuple(shape)} does not match the {n_devices} devices of --plan={target.name} "
                          f"(the sizes must multiply to {n_devices}, or leave one as -1).")


def plan_config(config, target: Target):
    """The config as it would run on the target: `model.dtype=auto` becomes bfloat16 on GPU/TPU (the trainer's
    auto rule, which looks at the local platform, would pick float32 on this CPU host), and `model.attention=auto`
    is planned as the `xla` reference there, an upper bound on the memory of the flash kernels auto picks on the
    target (this host's auto, `blocked`, is a CPU choice)."""
    config = config.copy_and_resolve_references()
    if target.platform in ("gpu", "tpu") and config.model.dtype == "auto":
        config.model.dtype = "bfloat16"
    if target.platform in ("gpu", "tpu") and config.model.attention == "auto":
        config.model.attention = "xla"
    if target.platform in ("gpu", "tpu") and config.model.layer_loop == "auto":
        config.model.layer_loop = "scan"  # the target's auto; this host's would unroll
    validate_train(config)
    return config


def _abstract_batch(global_batch: int, seq_len: int, sharding) -> dict:
    """The batch the loader yields (dsjax/data/packing.py's row), as abstract arrays on the batch sharding."""
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), v.dtype, sharding=sharding)
            for k, v in empty_row(1, 0).items()}


def _layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one layer, in metrics.flops_per_token's convention."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return 6 * (attn + 3 * cfg.d_model * cfg.d_ff) + 12 * cfg.n_heads * cfg.head_dim * seq_len


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs per token the backward pass spends recomputing the forward, by remat policy: full redoes each
    layer's forward (a third of its training FLOPs); save_dots keeps the projections' outputs but not batched
    products, so attention's QK^T and PV (4 * heads * head_dim * seq_len) are redone; none redoes nothing.
    Elementwise recompute is not counted."""
    if cfg.remat == "full":
        return cfg.n_layers * _layer_flops_per_token(cfg, seq_len) / 3
    if cfg.remat == "save_dots":
        return cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * seq_len
    return 0.0


def _exhausted_sentence(err: Exception) -> str | None:
    """XLA's RESOURCE_EXHAUSTED compile error, cut to its first line; None for any other error."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    line = text.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0].strip()
    return line.rstrip(".")


def _gib(x) -> str:
    """Bytes as GiB (MiB below one GiB, so small configs do not print as 0.00)."""
    if x is None:
        return "?"
    return f"{x / GiB:,.2f} GiB" if abs(x) >= GiB else f"{x / 2**20:,.2f} MiB"


def compile_plan(config, target: Target, devices: list, *, mfu: float = DEFAULT_MFU,
                 device_memory: int | None = None, log=lambda s: None) -> PlanResult:
    """Compiles the config's train step for `devices` and returns the report; raises ConfigError for bad input."""
    config = plan_config(config, target)
    shape = tuple(config.mesh.shape)
    _check_mesh(shape, len(devices), target)
    mesh = shd.make_mesh(shape, tuple(config.mesh.axes), devices=devices, dcn_shape=config.mesh.dcn_shape)
    rules = tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in config.mesh.rules)
    config = resolve(config, mesh, rules, log=log)
    model_cfg = model_config(config)

    from dsjax.train.tasks import task_class  # a task module may import data code; only when planning

    task = task_class(config.task)(config)
    schedule = make_schedule(config.optim, config.optim.lr, config.train.steps)
    tx = make_optimizer(config.optim, schedule)
    frozen = task.frozen(model_cfg)
    shardings = state_shardings(model_cfg, tx, mesh, rules, config.mesh.zero1, frozen)
    state = abstract_state(model_cfg, tx, shardings, frozen)
    batch_sharding = shd.batch_sharding(mesh, rules)
    gbs, seq_len, accum = config.train.global_batch_size, config.train.seq_len, config.train.grad_accum_steps
    batch = _abstract_batch(gbs, seq_len, batch_sharding)
    step = jit_train_step(graphdef_of(model_cfg), tx, task.loss, accum, schedule, shardings, batch_sharding)

    parts = {"params": memory._shard_bytes(state["params"], shardings["params"]),
             "opt_state": memory._shard_bytes(state["opt_state"], shardings["opt_state"]),
             "step": memory._shard_bytes(state["step"], shardings["step"]),
             "frozen": memory._shard_bytes(state["frozen"], shardings["frozen"]) if frozen is not None else 0,
             "batch": memory._shard_bytes(batch, {k: batch_sharding for k in batch})}
    capacity = device_memory or target.memory_bytes
    dp = shd.data_parallel_size(mesh, rules)
    record = {
        "config": config.name, "target": target.name, "describe": target.describe, "platform": target.platform,
        "devices": len(devices), "hosts": len({d.process_index for d in devices}),
        "device_kind": devices[0].device_kind, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "task": config.task, "remat": model_cfg.remat, "dtype": str(model_cfg.compute_dtype),
        "attention": model_cfg.attention, "global_batch_size": gbs, "seq_len": seq_len, "grad_accum_steps": accum,
        "micro_batch_per_device": gbs // accum // dp, "device_memory": capacity,
    }

    t0 = time.perf_counter()
    exhausted = None
    with shd.use_rules(mesh, rules):
        try:
            lowered = step.lower(state, batch)
        except KeyError as err:  # e.g. DPO's precomputed reference log-probs, which the plan does not model
            raise ConfigError(f"--plan: task {config.task} reads batch key {err.args[0]!r}, which the plan's "
                              "abstract batch (the packed rows of dsjax/data/packing.py) does not have.") from None
        try:
            compiled = lowered.compile()
        except Exception as err:  # XLA raises JaxRuntimeError; only RESOURCE_EXHAUSTED is an answer, not a bug
            exhausted = _exhausted_sentence(err)
            if exhausted is None:
                raise
    record["compile_s"] = round(time.perf_counter() - t0, 1)

    if exhausted is None:
        mem = compiled.memory_analysis()
        sizes = {"arguments": int(mem.argument_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                 "outputs": int(mem.output_size_in_bytes), "aliases": int(mem.alias_size_in_bytes),
                 "code": int(mem.generated_code_size_in_bytes)}
        # Donated state is written in place: outputs that alias arguments take no memory of their own.
        sizes["total"] = sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliases"]
        fits = capacity is None or sizes["total"] <= capacity
    else:
        sizes = dict.fromkeys(("arguments", "temporaries", "outputs", "aliases", "code", "total"))
        sizes["arguments"] = sum(parts.values())
        fits = False
    record["bytes_per_device"] = dict(sizes, **parts)
    record["fits"] = fits
    record["xla_error"] = exhausted

    tokens = gbs * seq_len
    flops_per_step = metrics.flops_per_token(model_cfg, seq_len) * tokens
    hardware_flops = flops_per_step + recompute_flops_per_token(model_cfg, seq_len) * tokens
    peak = metrics.peak_flops(device=devices[0], override=config.log.peak_flops_per_device)
    record.update(flops_per_token=metrics.flops_per_token(model_cfg, seq_len), flops_per_step=flops_per_step,
                  hardware_flops_per_step=hardware_flops, peak_flops_per_device=peak, mfu=mfu)
    if peak:
        step_s = hardware_flops / (len(devices) * peak * mfu)
        record.update(predicted_step_s=step_s, predicted_tokens_per_s=tokens / step_s,
                      train_steps=config.train.steps, train_tokens=config.train.steps * tokens,
                      predicted_days=config.train.steps * step_s / 86400)
    else:
        record.update(predicted_step_s=None, predicted_tokens_per_s=None)

    if exhausted is None:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost["flops"]) if cost and "flops" in cost else None
        micro_tokens = tokens // accum
        layers = 1 if model_cfg.scan_layers else model_cfg.n_layers  # XLA counts a scan body once
        once = micro_tokens * (6 * model_cfg.d_model * model_cfg.vocab_size
                               + layers * (_layer_flops_per_token(model_cfg, seq_len)
                                           + recompute_flops_per_token(model_cfg, seq_len) / model_cfg.n_layers))
        record["xla_flops_check"] = None if xla is None else {
            "xla_flops_all_devices": xla * len(devices), "formula_flops_same_count": once,
            "ratio": xla * len(devices) / once}
    record["scaling"] = scaling.model_report(model_cfg, seq_len, config.train.steps * tokens)
    return PlanResult(record, fits)


def not_fit_sentence(record: dict) -> str:
    b = record["bytes_per_device"]
    mesh = tuple(record["mesh"].values())
    where = (f"config {record['config']} does not fit {record['target']} ({record['describe']}) with "
             f"mesh.shape={mesh}, model.remat={record['remat']}, train.grad_accum_steps={record['grad_accum_steps']}")
    args = (f"arguments {_gib(b['arguments'])} per device: params {_gib(b['params'])}, optimizer "
            f"{_gib(b['opt_state'])}, batch {_gib(b['batch'])}")
    if record.get("xla_error"):
        need = f"XLA says: {record['xla_error']} ({args})"
    else:
        need = (f"it needs {_gib(b['total'])} per device ({args}; temporaries {_gib(b['temporaries'])}) but each "
                f"device has {_gib(record['device_memory'])}")
    tries = ["--plan_search"] + (["model.remat=full"] if record["remat"] != "full" else []) + \
        (["a larger train.grad_accum_steps"] if record["micro_batch_per_device"] > 1 else []) + ["more devices"]
    return f"{where}: {need}; try {', '.join(tries[:-1])} or {tries[-1]}."


def report(record: dict) -> str:
    """The plan as text, one fact a line."""
    b = record["bytes_per_device"]
    lines = [f"plan: config {record['config']} ({record['task']}) on {record['target']}: {record['describe']}, "
             f"{record['devices']} devices on {record['hosts']} host(s), device kind {record['device_kind']!r}",
             f"  mesh {record['mesh']}, model.remat={record['remat']}, compute dtype {record['dtype']}, attention "
             f"{record['attention']}, batch {record['global_batch_size']} x {record['seq_len']} tokens in "
             f"{record['grad_accum_steps']} micro-batch(es) of {record['micro_batch_per_device']} per device; compiled "
             f"in {record['compile_s']} s"]
    if record.get("xla_error"):
        lines.append(f"  compile failed: {record['xla_error']}")
    lines.append(f"  per device: arguments {_gib(b['arguments'])} (params {_gib(b['params'])}, optimizer state "
                 f"{_gib(b['opt_state'])}, batch {_gib(b['batch'])}" +
                 (f", frozen {_gib(b['frozen'])}" if b.get("frozen") else "") +
                 f"), temporaries {_gib(b['temporaries'])}, outputs {_gib(b['outputs'])}, aliased "
                 f"{_gib(b['aliases'])}")
    verdict = "fits" if record["fits"] else "DOES NOT FIT"
    lines.append(f"  total {_gib(b['total'])} of {_gib(record['device_memory'])} per device: {verdict}"
                 + (f" ({b['total'] / record['device_memory']:.0%})" if b["total"] and record["device_memory"]
                    else ""))
    if record["platform"] == "gpu" and b["total"]:
        lines.append(f"  (GPU: XLA preallocates 75% of memory by default; this step needs "
                     f"XLA_PYTHON_CLIENT_MEM_FRACTION >= {b['total'] / record['device_memory']:.2f})")
    lines.append(f"  FLOPs per step {record['flops_per_step']:.4g} ({record['flops_per_token']:.4g} per token, "
                 "dsjax/train/metrics.py)"
                 + (f"; {record['hardware_flops_per_step']:.4g} with the remat={record['remat']} recompute"
                    if record["hardware_flops_per_step"] != record["flops_per_step"] else ""))
    check = record.get("xla_flops_check")
    if check:
        lines.append(f"  XLA cost analysis, a scan body once (one layer if scanned; one micro-batch): "
                     f"{check['xla_flops_all_devices']:.4g} FLOPs over all devices vs {check['formula_flops_same_count']:.4g}"
                     f" from our formula for the same (ratio {check['ratio']:.3f})")
    if record.get("predicted_step_s"):
        lines.append(f"  predicted at {record['mfu']:.0%} MFU of {record['peak_flops_per_device']:.4g} FLOP/s per "
                     f"device: {record['predicted_step_s']:.3f} s per step, {record['predicted_tokens_per_s']:,.0f} "
                     f"tokens/s; {record['train_steps']:,} steps ({record['train_tokens']:.3g} tokens) in "
                     f"{record['predicted_days']:.1f} days")
    else:
        lines.append("  no peak FLOP/s known for this device: set --config.log.peak_flops_per_device for a time")
    s = record["scaling"]
    lines.append(f"  scaling laws (dsjax/scaling.py) for {s['C']:.3g} FLOPs (M {s['M']:.4g}/token): lr_opt "
                 f"{s['lr_opt']:.3g}, batch_opt {s['batch_seqs_opt']:,} sequences ({s['batch_tokens_opt']:.3g} "
                 f"tokens), M_opt {s['M_opt']:.3g}, D_opt {s['D_opt']:.3g}")
    return "\n".join(lines)


def to_json(record: dict) -> str:
    """Keys: target, devices, mesh, bytes_per_device {arguments, temporaries, outputs, aliases, total, ...},
    device_memory, fits, flops_per_step, predicted_step_s, and the rest of the record."""
    return json.dumps(record, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))


def run(config, target_name: str, *, json_path: str | None = None, search: bool = False,
        mfu: float = DEFAULT_MFU, device_memory_gib: float | None = None, out=print) -> int:
    """`--plan`: prints the plan (or the search's table), writes JSON; raises ConfigError or DoesNotFit."""
    from dsjax.train import targets

    if not 0 < mfu <= 1:
        raise ConfigError(f"--plan_mfu={mfu} must be in (0, 1].")
    if device_memory_gib is not None and not device_memory_gib > 0:
        raise ConfigError(f"--plan_device_memory={device_memory_gib} must be a positive number of GiB.")
    target = targets.lookup(target_name, cpu_devices=jax.device_count("cpu") if target_name == "cpu" else None)
    devices = target.devices()
    memory_bytes = int(device_memory_gib * GiB) if device_memory_gib else None
    if target.platform == "cpu" and memory_bytes is None:
        memory_bytes = memory.device_capacity(devices[0])
    if search:
        from dsjax.train.plan_search import search as run_search

        records = run_search(config, target, devices, mfu=mfu, device_memory=memory_bytes, out=out)
        if json_path:
            with open(json_path, "w") as f:
                f.write(to_json({"target": target.name, "candidates": records}))
        if not any(r["fits"] for r in records):
            raise DoesNotFit(f"config {config.name}: none of the {len(records)} meshes, remat policies and "
                             f"grad_accum steps tried fits {target.name} ({target.describe}).")
        return 0
    result = compile_plan(config, target, devices, mfu=mfu, device_memory=memory_bytes)
    out(report(result.record))
    if json_path:
        with open(json_path, "w") as f:
            f.write(to_json(result.record))
    if not result.fits:
        raise DoesNotFit(not_fit_sentence(result.record))
    return 0


def cli(config, target_name: str, **kwargs) -> int:
    """`run` with the CLI's exit codes: 0 fits, 2 a mistake in the input (one sentence), 3 does not fit."""
    import sys

    try:
        return run(config, target_name, **kwargs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DoesNotFit as err:
        print(f"error: {err}", file=sys.stderr)
        return NOT_FIT_EXIT
