"""The training loop shared by pretraining, SFT and DPO: a `Task` supplies the loss and the data, the rest is here.

Order of a run: validate the config -> fill lr/batch from the scaling laws if unset -> mesh -> memory preflight ->
data -> restore the newest checkpoint (or initialize) -> steps, with logging, evaluation and checkpoints by step
count and wall clock -> final checkpoint, evaluation and greedy samples. SIGTERM/SIGINT end the run after the
current step with a checkpoint; a non-finite loss or gradient stops it without one, the last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsjax import sharding as shd
from dsjax.config import model_config, validate_train
from dsjax.model import abstract_model, param_count
from dsjax.model.config import ConfigError
from dsjax.scaling import choose_hyperparams
from dsjax.train import memory, metrics as metrics_lib
from dsjax.train.checkpoint import TrainCheckpointer, restore_model
from dsjax.train.loss import next_token_loss
from dsjax.train.optimizer import make_optimizer, make_schedule
from dsjax.train.state import abstract_state, create_state, graphdef_of, state_shardings
from dsjax.train.step import make_eval_step, make_train_step


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass
class Task:
    """What differs between pretraining, SFT and DPO.

    loss_fn(model, batch) -> (loss_sum, weight_sum). data(config, split, seq_len, global_batch_size, process_index,
    process_count) -> an iterator of batch dicts with get_state()/set_state(). eval_bytes_per_token(config) -> UTF-8
    bytes per predicted token of the held-out split (for bits-per-byte), or None. tokenizer(config) -> a tokenizer for
    samples, or None.
    """

    loss_fn: Callable
    data: Callable
    eval_bytes_per_token: Callable | None = None
    tokenizer: Callable | None = None


def pretraining_task() -> Task:
    """Next-token prediction on the config's prepared datasets (data.datasets; "builtin" is the stdlib corpus)."""
    from dsjax.data import pipeline

    return Task(loss_fn=next_token_loss, data=pipeline.make_loader,
                eval_bytes_per_token=pipeline.eval_bytes_per_token, tokenizer=pipeline.load_config_tokenizer)


class _Signals:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _log(message: str):
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)


def _check_workdir(workdir: Path, config) -> None:
    """A workdir holds one run: resuming with a different model would restore the wrong shapes."""
    saved = workdir / "config.json"
    if saved.exists():
        previous = json.loads(saved.read_text()).get("model", {})
        current = json.loads(config.model.to_json())
        for key in SHAPE_KEYS:
            if previous.get(key) != current.get(key):
                raise ConfigError(
                    f"model.{key}={current.get(key)!r} differs from {previous.get(key)!r} of the run in {workdir}; "
                    "use another --workdir to start a new run."
                )


def _global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def _evaluate(eval_fn, params, task, config, sharding, bytes_per_token) -> dict:
    loader = task.data(config, "val", seq_len=config.train.seq_len, global_batch_size=config.eval.batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count(), num_epochs=1)
    loss_sum, weight_sum = 0.0, 0.0
    for i, local in enumerate(loader):
        if config.eval.steps and i >= config.eval.steps:
            break
        loss, weight = jax.device_get(eval_fn(params, _global_batch(local, sharding)))
        loss_sum, weight_sum = loss_sum + float(loss), weight_sum + float(weight)
    if weight_sum == 0:
        return {}
    out = {"eval_loss": loss_sum / weight_sum}
    if bytes_per_token:
        out["eval_bpb"] = loss_sum / math.log(2) / (weight_sum * bytes_per_token)
    return out


@dataclasses.dataclass
class Setup:
    """Everything a run needs before touching data or device memory."""

    config: object
    model_cfg: object
    mesh: jax.sharding.Mesh
    rules: tuple
    schedule: Callable
    shardings: dict
    target: dict  # abstract train state with shardings
    graphdef: object
    batch_sharding: jax.sharding.Sharding
    step: Callable  # jitted (state, batch) -> (state, metrics)
    eval: Callable  # jitted (params, batch) -> (loss_sum, weight_sum)
    tx: object


def prepare(config, task: Task) -> Setup:
    """Validates, resolves unset lr/batch, builds the mesh and the jitted steps, and runs the memory preflight.

    Allocates nothing on the devices, so a config that cannot fit is refused here in about a second.
    """
    validate_train(config)
    model_cfg = model_config(config)
    config = config.copy_and_resolve_references()
    config.unlock()
    mesh = shd.make_mesh(config.mesh.shape, tuple(config.mesh.axes))
    rules = tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in config.mesh.rules)
    dp = shd.data_parallel_size(mesh, rules)
    accum = config.train.grad_accum_steps
    if config.optim.lr is None or config.train.global_batch_size is None:
        choice = choose_hyperparams(config)
        unit = math.lcm(dp * accum, jax.process_count())
        batch = config.train.global_batch_size or max(unit, round(choice.global_batch_size / unit) * unit)
        config.optim.lr, config.train.global_batch_size = choice.lr, batch
        rounded = "" if batch == choice.global_batch_size else f" (batch rounded to {batch}, a multiple of {unit})"
        _log(f"scaling laws: {choice.explanation}{rounded}")
    gbs = config.train.global_batch_size
    if gbs % (dp * accum) or gbs % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the data-parallel size {dp} times "
                          f"train.grad_accum_steps={accum}.")
    if config.eval.batch_size is None:
        config.eval.batch_size = gbs // accum
    if config.eval.batch_size % dp:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size {dp}.")

    schedule = make_schedule(config.optim, config.optim.lr, config.train.steps)
    tx = make_optimizer(config.optim, schedule)
    shardings = state_shardings(model_cfg, tx, mesh, rules, config.mesh.zero1)
    target = abstract_state(model_cfg, tx, shardings)
    est = memory.estimate(model_cfg, target, shardings, gbs // accum // dp, config.train.seq_len)
    fits = memory.check_fits(config.name, est, len(jax.devices()), memory.device_capacity())
    _log(f"{config.name}: {param_count(abstract_model(model_cfg)):,} parameters, mesh {dict(mesh.shape)}, {fits}")

    graphdef = graphdef_of(model_cfg)
    batch_sharding = shd.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(make_train_step(graphdef, tx, task.loss_fn, accum, schedule),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated), donate_argnums=(0,))
    evaluate = jax.jit(make_eval_step(graphdef, task.loss_fn), in_shardings=(shardings["params"], batch_sharding),
                       out_shardings=replicated)
    return Setup(config, model_cfg, mesh, rules, schedule, shardings, target, graphdef, batch_sharding, step,
                 evaluate, tx)


def _log_eval(run, state, task, config, bytes_per_token, writer, step, last):
    result = _evaluate(run.eval, state["params"], task, config, run.batch_sharding, bytes_per_token)
    if result:
        _log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        writer.write(step, result)
        last.update(result)


def train(config, workdir, *, task: Task | None = None, profile: bool = False) -> dict:
    """Runs (or resumes) the run `config` in `workdir`; returns the last logged metrics (and `step`)."""
    task = task or pretraining_task()
    workdir = Path(workdir)
    run = prepare(config, task)
    config = run.config
    _check_workdir(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json(indent=2))

    train_data = task.data(config, "train", seq_len=config.train.seq_len,
                           global_batch_size=config.train.global_batch_size,
                           process_index=jax.process_index(), process_count=jax.process_count())
    bytes_per_token = task.eval_bytes_per_token(config) if task.eval_bytes_per_token else None
    ckpt = TrainCheckpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    writer = metrics_lib.MetricsWriter(workdir, config.log.tensorboard, enabled=jax.process_index() == 0)
    try:
        state, rng = _restore_or_init(run, ckpt, train_data)
        state, step, last = _run_steps(run, state, rng, train_data, ckpt, writer, task, bytes_per_token, workdir,
                                       profile)
    finally:
        ckpt.close()
        writer.close()
    if step == config.train.steps and task.tokenizer and config.log.samples and jax.process_index() == 0:
        from dsjax.train.samples import greedy_samples

        tokenizer = task.tokenizer(config)
        for prompt, completion in greedy_samples(run.graphdef, state["params"], tokenizer, config.log.samples,
                                                 config.log.sample_tokens, min(config.train.seq_len, 256)):
            _log(f"--- sample: {prompt!r}\n{prompt}{completion}")
    return dict(last, step=step)


def _restore_or_init(run: Setup, ckpt: TrainCheckpointer, train_data):
    restored = ckpt.restore_latest(run.target, log=_log)
    if restored is not None:
        state, meta = restored
        train_data.set_state(meta["data_state"])
        _log(f"resumed from {ckpt.root / str(meta['step'])}")
        return state, np.asarray(meta["rng"], np.uint32)
    config = run.config
    params = _initial_params(config, run.model_cfg, run.shardings["params"]) if config.train.init_from else None
    init = jax.jit(lambda p: create_state(run.model_cfg, run.tx, config.seed, p), out_shardings=run.shardings)
    return init(params), np.asarray(jax.random.key_data(jax.random.PRNGKey(config.seed)))


def _run_steps(run: Setup, state, rng, train_data, ckpt, writer, task, bytes_per_token, workdir, profile):
    config = run.config
    start = step = int(jax.device_get(state["step"]))
    tokens_per_step = config.train.global_batch_size * config.train.seq_len
    flops_per_step = metrics_lib.flops_per_token(run.model_cfg, config.train.seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops(override=config.log.peak_flops_per_device)
    meta = lambda: {"model_config": dataclasses.asdict(run.model_cfg), "data_state": train_data.get_state(),
                    "rng": np.asarray(rng).tolist(), "config_name": config.name}
    last, last_save = {}, time.monotonic()
    t_last, steps_since = time.perf_counter(), 0
    bar = tqdm(total=config.train.steps, initial=start, disable=not config.log.progress_bar or jax.process_index() > 0,
               dynamic_ncols=True, file=sys.stdout)
    with _Signals() as signals, shd.use_rules(run.mesh, run.rules):
        if step == 0 and config.eval.every_steps:  # the untrained baseline, for a before/after on the same data
            _log_eval(run, state, task, config, bytes_per_token, writer, 0, last)
        while step < config.train.steps:
            if profile and step == start + 2:
                jax.profiler.start_trace(str(workdir / "profile"))
            state, out = run.step(state, _global_batch(next(train_data), run.batch_sharding))
            out = jax.device_get(out)
            if profile and step == start + 5:
                jax.profiler.stop_trace()
            if not out["finite"]:
                ckpt.wait()
                kept = ckpt.steps()
                raise NonFiniteError(
                    f"loss {out['loss']} / grad norm {out['grad_norm']} at step {step + 1} is not finite; the run "
                    f"stopped without applying it. Last good checkpoint: "
                    f"{ckpt.root / str(kept[-1]) if kept else 'none'}."
                )
            step, steps_since = step + 1, steps_since + 1
            bar.update(1)
            if step % config.log.every_steps == 0 or step == config.train.steps:
                now = time.perf_counter()
                step_time, t_last, steps_since = (now - t_last) / steps_since, now, 0
                last = {"loss": float(out["loss"]), "lr": float(out["lr"]), "grad_norm": float(out["grad_norm"]),
                        "step_time": step_time, "tokens_per_s": tokens_per_step / step_time}
                if peak:
                    last["mfu"] = flops_per_step / step_time / (peak * len(jax.devices()))
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                writer.write(step, last)
            if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == config.train.steps):
                _log_eval(run, state, task, config, bytes_per_token, writer, step, last)
                t_last = time.perf_counter()  # evaluation time is not step time
            minutes = (time.monotonic() - last_save) / 60
            due = step % config.checkpoint.every_steps == 0 or minutes >= config.checkpoint.every_minutes
            if due or step == config.train.steps or signals.received:
                ckpt.save(step, state, meta())
                last_save = time.monotonic()
            if signals.received:
                ckpt.wait()
                _log(f"{signals.received} received: saved checkpoint {ckpt.root / str(step)} and stopped.")
                break
    bar.close()
    return state, step, last


SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def _initial_params(config, model_cfg, shardings) -> dict:
    """Parameters of `train.init_from` (a dsjax checkpoint, e.g. an imported HF model) for a fresh run."""
    keep = {k: getattr(model_cfg, k) for k in ("attention", "remat", "dtype", "param_dtype")}
    model = restore_model(config.train.init_from, shardings=shardings, **keep)
    for key in SHAPE_KEYS:
        if getattr(model.config, key) != getattr(model_cfg, key):
            raise ConfigError(f"train.init_from={config.train.init_from!r} has {key}={getattr(model.config, key)} "
                              f"but model.{key}={getattr(model_cfg, key)}.")
    _log(f"initialized parameters from {config.train.init_from}")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
