"""AdamW with global-norm clipping and the learning-rate schedules: the paper's multi-step, cosine, and WSD.

The paper: AdamW (beta1 0.9, beta2 0.95, weight decay 0.1), gradients clipped at global norm 1.0, and a multi-step
schedule: linear warmup over 2000 steps to the peak, 31.6% of the peak after 80% of the training tokens, 10% after
90%. The batch is constant, so "tokens" is "steps" here. DPO uses cosine; WSD (warmup-stable-decay) is the
multi-step idea with a linear final decay.

Weight decay applies to every matrix (attention and FFN projections, the embedding and the output head) but not to
the RMSNorm gains, which are scales around 1 that decay would pull toward 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsjax.config import SCHEDULES
from dsjax.errors import ConfigError


def _warmup(step, peak, warmup_steps):
    return peak * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))


def multistep_schedule(peak: float, total_steps: int, warmup_steps: int, boundaries=(0.8, 0.9), factors=(0.316, 0.1)):
    """Linear warmup, then peak; factors[i] * peak from boundaries[i] * total_steps on."""

    def schedule(step):
        lr = _warmup(step, peak, warmup_steps)
        for boundary, factor in zip(boundaries, factors):
            lr = jnp.where(step >= int(round(boundary * total_steps)), peak * factor, lr)
        return lr

    return schedule


def cosine_schedule(peak: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio * peak at the last step."""

    def schedule(step):
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        decayed = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup_steps, _warmup(step, peak, warmup_steps), decayed)

    return schedule


def wsd_schedule(peak: float, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2, min_ratio: float = 0.1):
    """Linear warmup, constant peak, then a linear decay to min_ratio * peak over the last decay_fraction of steps."""
    decay_start = int(round((1 - decay_fraction) * total_steps))

    def schedule(step):
        progress = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
        decayed = peak * (1 - (1 - min_ratio) * progress)
        return jnp.where(step < warmup_steps, _warmup(step, peak, warmup_steps), decayed)

    return schedule


def make_schedule(optim_cfg, peak_lr: float, total_steps: int):
    name = optim_cfg.schedule
    if name == "multistep":
        return multistep_schedule(peak_lr, total_steps, optim_cfg.warmup_steps, tuple(optim_cfg.multistep_boundaries),
                                  tuple(optim_cfg.multistep_factors))
    if name == "cosine":
        return cosine_schedule(peak_lr, total_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio)
    if name == "wsd":
        return wsd_schedule(peak_lr, total_steps, optim_cfg.warmup_steps, optim_cfg.decay_fraction,
                            optim_cfg.min_lr_ratio)
    raise ConfigError(f"optim.schedule={name!r} is not one of {', '.join(SCHEDULES)}.")


def decay_mask(params):
    """True for weights that decay: every parameter except the 1-D (per layer) norm gains."""
    def is_matrix(path, leaf):
        return not any(getattr(k, "key", None) == "weight" for k in path)  # norm gains are `<norm>.weight`
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optim_cfg, schedule) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip_norm),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, mask=decay_mask),
    )
