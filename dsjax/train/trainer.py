"""The trainer: one loop for every task (pretraining, SFT, DPO; see tasks/). Its job: steps, logging, evaluation,
checkpoints by step count and wall clock, signals, profiling.

Order of a run: validate the config -> mesh -> fill lr/batch from the scaling laws if unset (resolve.py) -> the task
(a bad dataset is refused here) -> memory preflight -> data iterators -> only then anything written: config.json and
the tokenizer into the workdir -> restore the newest checkpoint (or initialize) -> steps -> final checkpoint,
evaluation and the task's report.

Host and device overlap: a step is dispatched, then the next batch is read, packed and transferred while it runs;
metrics are read back only when they are logged, evaluated on or saved. A non-finite loss or gradient is never
applied (the step keeps the old state, step.py), and the flags of all steps since the last read-back are checked
before every log line and every save, so a run that went non-finite stops without writing a checkpoint after it.

Multi-host: every process runs every computation on global arrays (evaluation and the end-of-run report included);
files the run owns (config.json, the tokenizer, metrics, moving a bad checkpoint aside) are written by process 0,
with a barrier where the others depend on them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsjax import checkpoint as params_ckpt
from dsjax import sharding as shd
from dsjax.config import model_config, validate_train
from dsjax.errors import ConfigError
from dsjax.model import abstract_model, param_count
from dsjax.train import memory, metrics as metrics_lib
from dsjax.train.checkpoint import TrainCheckpointer, barrier, move_previous_run
from dsjax.train.optimizer import make_optimizer, make_schedule
from dsjax.train.resolve import resolve
from dsjax.train.state import abstract_state, create_state, graphdef_of, state_shardings
from dsjax.train.step import jit_train_step, make_eval_step
from dsjax.train.tasks import task_class

# Keys of the step's metrics that are the trainer's own; every other key is an aux metric of the task.
STEP_KEYS = ("loss", "grad_norm", "lr", "tokens", "finite")
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


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
        self.received = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _log(message: str):
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)


class Trainer:
    """`Trainer(config, workdir).run()`; everything before `run` validates and plans, allocating and writing nothing.

    task: a Task subclass (or any callable config -> Task); default: the one `config.task` names.
    restart: start over from step 0, moving the workdir's old checkpoints and metrics aside first.
    """

    def __init__(self, config, workdir, *, task=None, restart: bool = False, profile: bool = False):
        validate_train(config)
        self.workdir, self.restart, self.profile = Path(workdir), restart, profile
        self.model_cfg = model_config(config)
        self.mesh = shd.make_mesh(config.mesh.shape, tuple(config.mesh.axes), dcn_shape=config.mesh.dcn_shape)
        self.rules = tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in config.mesh.rules)
        self.config = config = resolve(config, self.mesh, self.rules, log=_log)
        self.task = (task or task_class(config.task))(config)
        if config.train.epochs:
            per_epoch = self.task.batches_per_epoch(config.train.global_batch_size)
            config = config.copy_and_resolve_references()
            config.train.steps = config.train.epochs * per_epoch
            self.config = self.task.config = config
            _log(f"train.epochs={config.train.epochs}: {per_epoch} batches of {config.train.global_batch_size} per "
                 f"epoch, {config.train.steps} steps")
        self.schedule = make_schedule(config.optim, config.optim.lr, config.train.steps)
        self.tx = make_optimizer(config.optim, self.schedule)
        self.frozen = self.task.frozen(self.model_cfg)
        self.shardings = state_shardings(self.model_cfg, self.tx, self.mesh, self.rules, config.mesh.zero1,
                                         self.frozen)
        self.target = abstract_state(self.model_cfg, self.tx, self.shardings, self.frozen)
        accum = config.train.grad_accum_steps
        micro = config.train.global_batch_size // accum // shd.data_parallel_size(self.mesh, self.rules)
        est = memory.estimate(self.model_cfg, self.target, self.shardings, micro, config.train.seq_len)
        fits = memory.check_fits(config.name, est, len(jax.devices()), memory.device_capacity())
        _log(f"{config.name}: {param_count(abstract_model(self.model_cfg)):,} parameters, mesh "
             f"{dict(self.mesh.shape)}, {fits}")

        self.eval_tasks = _eval_tasks(config.eval.tasks)
        self.graphdef = graphdef_of(self.model_cfg)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.step_fn = jit_train_step(self.graphdef, self.tx, self.task.loss, accum, self.schedule, self.shardings,
                                      self.batch_sharding)
        self.eval_fn = jax.jit(make_eval_step(self.graphdef, self.task.loss),
                               in_shardings=(self.shardings["params"], self.shardings.get("frozen"),
                                             self.batch_sharding), out_shardings=replicated)

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        """Runs (or resumes) the run; returns the last logged metrics, `step`, and `preempted` (a signal or None)."""
        config = self.config
        self._check_workdir()
        self.task.setup(mesh=self.mesh, rules=self.rules, batch_sharding=self.batch_sharding, workdir=self.workdir,
                        log=_log)
        shares = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.train_data = self.task.train_data(global_batch_size=config.train.global_batch_size, **shares)
        self.val_data = (self.task.val_data(global_batch_size=config.eval.batch_size, **shares)
                         if config.eval.every_steps else None)
        self.val_start = self.val_data.get_state() if self.val_data is not None else None
        if self.restart and (moved := move_previous_run(self.workdir)):
            _log(f"--restart: the previous run's checkpoints and metrics are now in {moved}")
        self._write_run_files()
        ckpt = TrainCheckpointer(self.workdir, config.checkpoint.keep, config.checkpoint.async_save)
        writer = metrics_lib.MetricsWriter(self.workdir, config.log.tensorboard, enabled=jax.process_index() == 0)
        try:
            state, rng = self._restore_or_init(ckpt)
            state, step, last, stopped = self._loop(state, rng, ckpt, writer)
            if step >= config.train.steps:
                with shd.use_rules(self.mesh, self.rules):
                    report = self.task.report(nnx.merge(self.graphdef, state["params"]), self.mesh, _log)
                if report:
                    writer.write(step, report)
                    last.update(report)
        finally:
            ckpt.close()
            writer.close()
        return dict(last, step=step, preempted=stopped)

    def _check_workdir(self):
        """A workdir holds one run: resuming with a different model would restore the wrong shapes."""
        saved = self.workdir / "config.json"
        if saved.exists() and not self.restart:
            previous = json.loads(saved.read_text()).get("model", {})
            current = json.loads(self.config.model.to_json())
            for key in SHAPE_KEYS:
                if previous.get(key) != current.get(key):
                    raise ConfigError(
                        f"model.{key}={current.get(key)!r} differs from {previous.get(key)!r} of the run in "
                        f"{self.workdir}; use another --workdir to start a new run."
                    )

    def _write_run_files(self):
        """config.json (the resolved config) and a copy of the tokenizer, so the workdir alone can be served."""
        self.tokenizer = self.task.tokenizer()
        if self.eval_tasks and self.tokenizer is None:
            raise ConfigError(f"eval.tasks={self.config.eval.tasks!r} needs a tokenizer, and task "
                              f"{self.task.name} has none.")
        if jax.process_index() == 0:
            self.workdir.mkdir(parents=True, exist_ok=True)
            partial = self.workdir / ".config.json.partial"
            partial.write_text(self.config.to_json(indent=2))
            partial.replace(self.workdir / "config.json")
            if self.tokenizer is not None:
                name = "tokenizer.json" if self.tokenizer.path.suffix == ".json" else "tokenizer.model"
                if not (self.workdir / name).exists():
                    shutil.copyfile(self.tokenizer.path, self.workdir / f".{name}.partial")
                    (self.workdir / f".{name}.partial").replace(self.workdir / name)
        barrier("dsjax-run-files")

    def _meta(self, rng) -> dict:
        meta = {"model_config": dataclasses.asdict(self.model_cfg), "data_state": self.train_data.get_state(),
                "rng": np.asarray(rng).tolist(), "config_name": self.config.name, "task": self.config.task}
        if self.tokenizer is not None:
            meta["tokenizer"] = dict(self.tokenizer.describe(), file=str(self.tokenizer.path.absolute()))
        return meta

    def _restore_or_init(self, ckpt: TrainCheckpointer):
        save_frozen = self.frozen is None or self.frozen.save
        restored = ckpt.restore_latest(self.target, restore_frozen=save_frozen, log=_log)
        if restored is not None:
            state, meta = restored
            if self.frozen is not None and not save_frozen:
                state["frozen"] = self.frozen.load(self.shardings["frozen"])
            self.train_data.set_state(meta["data_state"])
            steps = self.config.train.steps
            if meta["step"] >= steps:
                _log(f"the run in {self.workdir} is already finished (step {meta['step']} of {steps}); pass "
                     "--restart to train it again, or raise train.steps to continue it")
            else:
                _log(f"resumed from {ckpt.root / str(meta['step'])}")
            return state, np.asarray(meta["rng"], np.uint32)
        config = self.config
        params = self._initial_params() if config.train.init_from else None
        init = jax.jit(lambda p: create_state(self.model_cfg, self.tx, config.seed, p),
                       out_shardings={k: v for k, v in self.shardings.items() if k != "frozen"})
        state = init(params)
        if self.frozen is not None:
            state["frozen"] = self.frozen.load(self.shardings["frozen"])
        return state, np.asarray(jax.random.key_data(jax.random.PRNGKey(config.seed)))

    def _initial_params(self) -> dict:
        """Parameters of `train.init_from` (a dsjax checkpoint or workdir, or a Hugging Face model directory)."""
        path, cfg = self.config.train.init_from, self.model_cfg
        keep = {k: getattr(cfg, k) for k in params_ckpt.RUNTIME_FIELDS}
        model = params_ckpt.load_model(path, shardings=self.shardings["params"], **keep)
        for key in SHAPE_KEYS:
            if getattr(model.config, key) != getattr(cfg, key):
                raise ConfigError(f"train.init_from={path!r} has {key}={getattr(model.config, key)} but "
                                  f"model.{key}={getattr(cfg, key)}.")
        _log(f"initialized parameters from {path}")
        return params_ckpt.params_dict(model)

    # ----------------------------------------------------------------------------------------------- the loop

    def _global(self, local: dict) -> dict:
        """This process's rows -> global arrays over the mesh (transferred asynchronously)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items()}

    def _next_batch(self) -> dict:
        return self._global(next(self.train_data))

    def _loop(self, state, rng, ckpt, writer):
        config = self.config
        steps, save_frozen = config.train.steps, self.frozen is None or self.frozen.save
        start = step = int(jax.device_get(state["step"]))
        tokens_per_step = config.train.global_batch_size * config.train.seq_len
        flops_per_step = metrics_lib.flops_per_token(self.model_cfg, config.train.seq_len) * tokens_per_step
        peak = metrics_lib.peak_flops(override=config.log.peak_flops_per_device)
        last, pending, last_save = {}, [], time.monotonic()
        t_last, steps_since = time.perf_counter(), 0
        bar = tqdm(total=steps, initial=min(start, steps), dynamic_ncols=True, file=sys.stdout,
                   disable=not config.log.progress_bar or jax.process_index() > 0)
        stopped = None
        with _Signals() as signals, shd.use_rules(self.mesh, self.rules):
            if step == 0 and config.eval.every_steps:  # the untrained baseline, for a before/after on the same data
                self._log_eval(state, writer, 0, last)
            batch = self._next_batch() if step < steps else None
            while step < steps:
                if self.profile and step == start + 2:
                    jax.profiler.start_trace(str(self.workdir / "profile"))
                state, out = self.step_fn(state, batch)
                step, steps_since = step + 1, steps_since + 1
                pending.append((step, out))
                if self.profile and step == start + 6:
                    jax.block_until_ready(out)
                    jax.profiler.stop_trace()
                bar.update(1)
                log_due = step % config.log.every_steps == 0 or step == steps
                eval_due = bool(config.eval.every_steps) and (step % config.eval.every_steps == 0 or step == steps)
                save_due = (step % config.checkpoint.every_steps == 0 or step == steps or signals.received
                            or (time.monotonic() - last_save) / 60 >= config.checkpoint.every_minutes)
                if not save_due and step < steps:
                    batch = self._next_batch()  # read and transfer while the device runs this step
                if log_due or eval_due or save_due:
                    host = self._check_finite(pending, ckpt)
                    pending = []
                if log_due:
                    now = time.perf_counter()
                    step_time, t_last, steps_since = (now - t_last) / steps_since, now, 0
                    aux = {k: float(v) for k, v in host.items() if k not in STEP_KEYS}
                    last = {**self.task.summarize({"loss": float(host["loss"]), **aux}, ""),
                            "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
                            "step_time": step_time, "tokens_per_s": tokens_per_step / step_time}
                    if peak:
                        last["mfu"] = flops_per_step / step_time / (peak * len(jax.devices()))
                    bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    writer.write(step, last)
                if eval_due:
                    self._log_eval(state, writer, step, last)
                    t_last = time.perf_counter()  # evaluation time is not step time
                if save_due:
                    ckpt.save(step, state, self._meta(rng), save_frozen=save_frozen)
                    last_save = time.monotonic()
                    if step < steps and not signals.received:
                        batch = self._next_batch()
                if signals.received:
                    ckpt.wait()
                    stopped = signals.received
                    _log(f"{stopped.name} received: saved checkpoint {ckpt.root / str(step)} and stopped (preempted); "
                         "the same command resumes from it.")
                    break
        bar.close()
        if self.profile and start + 2 <= step < start + 6:  # a run shorter than the profiled window
            jax.profiler.stop_trace()
        return state, step, last, stopped

    def _check_finite(self, pending, ckpt) -> dict:
        """Reads back the metrics of the steps since the last check; stops at the first non-finite one."""
        host = jax.device_get([out for _, out in pending])
        for (step, _), out in zip(pending, host):
            if not out["finite"]:
                ckpt.wait()
                kept = ckpt.steps()
                raise NonFiniteError(
                    f"loss {out['loss']} / grad norm {out['grad_norm']} at step {step} is not finite; the run "
                    f"stopped without applying it. Last good checkpoint: "
                    f"{ckpt.root / str(kept[-1]) if kept else 'none'}."
                )
        return host[-1]

    def _evaluate(self, state) -> dict:
        """Held-out metrics over up to eval.steps batches, every process taking part; sums are read back once."""
        self.val_data.set_state(self.val_start)
        outs = []
        for i, local in enumerate(self.val_data):
            if self.config.eval.steps and i >= self.config.eval.steps:
                break
            outs.append(self.eval_fn(state["params"], state.get("frozen"), self._global(local)))
        outs = jax.device_get(outs)
        weight = sum(float(o["weight"]) for o in outs)
        if weight == 0:
            return {}
        means = {"loss": sum(float(o["loss"]) for o in outs) / weight}
        for key in (outs[0]["aux"] if outs else {}):
            means[key] = sum(float(o["aux"][key]) for o in outs) / weight
        return self.task.summarize(means, "eval_")

    def _log_eval(self, state, writer, step, last):
        result = self._evaluate(state)
        model = nnx.merge(self.graphdef, state["params"])
        result.update(self.task.on_eval(model, step, _log))
        if self.eval_tasks:
            result.update(self._run_eval_tasks(model))
        if result:
            _log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            writer.write(step, result)
            last.update(result)


    def _run_eval_tasks(self, model) -> dict:
        """eval.tasks through dsjax.eval's own code, on this run's mesh, every process taking part."""
        from dsjax.eval.scoring import Scorer
        from dsjax.eval.tasks import run_task

        scorer = Scorer(model, self.mesh, self.rules, batch_size=self.config.eval.batch_size)
        out = {}
        for spec in self.eval_tasks:
            result = run_task(spec, scorer, self.tokenizer, model=model, stream=_NullStream())
            out.update({f"eval/{spec.name}/{k}": float(v) for k, v in result["metrics"].items()
                        if isinstance(v, (int, float))})
        return out


class _NullStream:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _eval_tasks(spec_text: str) -> list:
    """The parsed eval.tasks, refused at start with one sentence if a spec is malformed."""
    if not spec_text:
        return []
    from dsjax.eval.tasks import parse_spec

    try:
        return [parse_spec(spec.strip()) for spec in str(spec_text).split(";") if spec.strip()]
    except ConfigError as err:
        raise ConfigError(f"eval.tasks: {err}") from None


def train(config, workdir, *, task=None, restart: bool = False, profile: bool = False) -> dict:
    """Runs (or resumes) the run `config` in `workdir`; returns the last logged metrics, `step` and `preempted`."""
    return Trainer(config, workdir, task=task, restart=restart, profile=profile).run()
