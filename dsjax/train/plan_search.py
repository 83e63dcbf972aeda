"""`--plan=TARGET --plan_search`: the meshes, remat policies and micro-batch sizes that fit a target, ranked.

Each candidate is a real compile (dsjax/train/plan.py), so the table holds the executable's bytes, not estimates.
To keep the number of compiles small:

- meshes: (1, N/t, t) for tensor splits t in 1, 2, 4, 8 that divide the device count, the heads and the FFN width
  (and stay inside one host on GPU, where NVLink ends); on several GPU hosts also (hosts, N/hosts/t, t): FSDP
  inside a host, data parallelism (ZeRO-1) across hosts.
- per mesh, remat none -> save_dots -> full, in falling predicted speed (plan.recompute_flops_per_token); the
  first policy that fits ends the mesh, since every later one is predicted slower.
- per policy, train.grad_accum_steps from the config's value up: when a compile does not fit, the next try jumps
  to the accumulation at which its temporaries (which scale with the micro-batch) would fit, at most
  MAX_TRIES compiles; a state that alone exceeds the device is not tried further.

A TPU compile that runs out of memory fails within seconds, so failed tries cost little there; a GPU compile
always runs to the end (XLA only warns), about 15 s for the 7B on this 2-core host.
"""

from __future__ import annotations

import math
import re
import time

from dsjax.errors import ConfigError
from dsjax.train import plan as plan_lib
from dsjax.train.targets import GPUS_PER_HOST, Target

REMATS = ("none", "save_dots", "full")
TENSOR_SPLITS = (1, 2, 4, 8)
MAX_TRIES = 4


def meshes(config, target: Target, n_devices: int) -> list[tuple[int, int, int]]:
    m = config.model
    hosts = max(1, n_devices // GPUS_PER_HOST) if target.platform == "gpu" else 1
    out = []
    for t in TENSOR_SPLITS:
        if n_devices % t or m.n_heads % t or m.d_ff % t:
            continue
        if target.platform == "gpu" and t > min(GPUS_PER_HOST, n_devices):
            continue
        out.append((1, n_devices // t, t))
        if hosts > 1 and (n_devices // hosts) % t == 0:
            out.append((hosts, n_devices // hosts // t, t))
    return out


def _valid_accums(global_batch: int, dp: int) -> list[int]:
    """grad_accum_steps values that split the batch into whole per-device micro-batches."""
    per_device = global_batch // dp
    return [a for a in range(1, per_device + 1) if per_device % a == 0] if global_batch % dp == 0 else []


def _temporaries_from_error(text: str | None) -> float | None:
    """TPU's RESOURCE_EXHAUSTED names the temporaries it needed, e.g. '... HLO temporaries (518.14G) ...'."""
    match = re.search(r"temporaries \(([\d.]+)([KMGT])\)", text or "")
    if not match:
        return None
    return float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024


def _next_accum(record: dict, accums: list[int], capacity: int | None) -> int | None:
    """The accumulation at which this compile's temporaries, scaled by the micro-batch, would fit; None: nothing
    will (the state alone is too big, or the micro-batch is already one sequence per device)."""
    accum, b = record["grad_accum_steps"], record["bytes_per_device"]
    later = [a for a in accums if a > accum]
    if not later or capacity is None:
        return None
    temps = b["temporaries"] if b["temporaries"] is not None else _temporaries_from_error(record.get("xla_error"))
    fixed = b["arguments"] + (b["outputs"] or 0) - (b["aliases"] or 0) if b["outputs"] is not None \
        else b["arguments"]
    if fixed >= capacity:
        return None
    if temps is None:
        return later[0]
    want = accum * temps / (capacity - fixed)
    return next((a for a in later if a >= want), later[-1])


def search(config, target: Target, devices: list, *, mfu: float, device_memory: int | None, out=print) -> list:
    """Compiles the candidates, prints a ranked table of those that fit, returns every record tried."""
    n = len(devices)
    candidates = meshes(config, target, n)
    if not candidates:
        raise ConfigError(f"--plan_search: no mesh over the {n} devices of {target.name} splits model.n_heads="
                          f"{config.model.n_heads} and model.d_ff={config.model.d_ff}.")
    gbs = config.train.global_batch_size
    if gbs is None:
        raise ConfigError("--plan_search needs train.global_batch_size set (the accumulation steps divide it).")
    out(f"plan search: {config.name} on {target.name} ({target.describe}), meshes {candidates}, remat "
        f"{'/'.join(REMATS)}, grad_accum from {config.train.grad_accum_steps} up; MFU {mfu:.0%} assumed")
    records, start = [], time.perf_counter()
    for shape in candidates:
        dp = math.prod(s for s, axis in zip(shape, config.mesh.axes) if axis in _batch_axes(config))
        accums = _valid_accums(gbs, dp)
        if not accums:
            continue
        for remat in REMATS:
            accum = next((a for a in accums if a >= config.train.grad_accum_steps), accums[-1])
            fitted = False
            for _ in range(MAX_TRIES):
                trial = config.copy_and_resolve_references()
                trial.mesh.shape = shape
                trial.model.remat = remat
                trial.train.grad_accum_steps = accum
                record = plan_lib.compile_plan(trial, target, devices, mfu=mfu, device_memory=device_memory).record
                records.append(record)
                total = record["bytes_per_device"]["total"]
                out(f"  mesh {shape} remat {remat:<9} grad_accum {accum:>4}: "
                    + (f"{plan_lib._gib(total)}" if total is not None else "out of memory")
                    + (" fits" if record["fits"] else " does not fit") + f" ({record['compile_s']} s)")
                if record["fits"]:
                    fitted = True
                    break
                accum = _next_accum(record, accums, device_memory or target.memory_bytes)
                if accum is None:
                    break
            if fitted:
                break
    fits = sorted((r for r in records if r["fits"]),
                  key=lambda r: (-(r["predicted_tokens_per_s"] or 0), r["grad_accum_steps"],
                                 r["bytes_per_device"]["total"]))
    out(f"{len(records)} compiles in {time.perf_counter() - start:.0f} s; {len(fits)} fit, ranked by predicted "
        "tokens/s (then fewer micro-batches, then less memory):")
    out(table(fits))
    return records


def _batch_axes(config) -> tuple[str, ...]:
    rule = dict(config.mesh.rules).get("batch")
    return () if rule is None else ((rule,) if isinstance(rule, str) else tuple(rule))


def table(records: list) -> str:
    """A markdown table of plan records."""
    lines = ["| rank | mesh (data, fsdp, tensor) | remat | grad_accum | micro-batch / device | per device | of | "
             "step s | tokens/s |", "|" + "---|" * 9]
    for i, r in enumerate(records, 1):
        step = r["predicted_step_s"]
        speed = f"{step:.2f} | {r['predicted_tokens_per_s']:,.0f}" if step else "- | -"
        lines.append(f"| {i} | {tuple(r['mesh'].values())} | {r['remat']} | {r['grad_accum_steps']} | "
                     f"{r['micro_batch_per_device']} | {plan_lib._gib(r['bytes_per_device']['total'])} | "
                     f"{plan_lib._gib(r['device_memory'])} | {speed} |")
    return "\n".join(lines)
