"""The run's numbers that depend on the mesh: lr and batch from the scaling laws when unset, batch divisibility.

`resolve` returns a new, locked config and leaves the caller's untouched; what it fills in is what `config.json`
in the workdir records, so a resumed run reads the same values back.
"""

from __future__ import annotations

import math

import jax

from dsjax import sharding as shd
from dsjax.errors import ConfigError
from dsjax.scaling import choose_hyperparams


def resolve(config, mesh, rules, log=print):
    config = config.copy_and_resolve_references()
    dp = shd.data_parallel_size(mesh, rules)
    accum = config.train.grad_accum_steps
    if config.optim.lr is None or config.train.global_batch_size is None:
        choice = choose_hyperparams(config)
        unit = math.lcm(dp * accum, jax.process_count())
        batch = config.train.global_batch_size or max(unit, round(choice.global_batch_size / unit) * unit)
        config.optim.lr, config.train.global_batch_size = choice.lr, batch
        rounded = "" if batch == choice.global_batch_size else f" (batch rounded to {batch}, a multiple of {unit})"
        log(f"scaling laws: {choice.explanation}{rounded}")
    gbs = config.train.global_batch_size
    if gbs % (dp * accum) or gbs % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the data-parallel size {dp} times "
                          f"train.grad_accum_steps={accum}.")
    if config.eval.batch_size is None:
        config.eval.batch_size = gbs // accum
    if config.eval.batch_size % dp:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size "
                          f"{dp}.")
    config.lock()
    return config
