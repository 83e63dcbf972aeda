"""Precomputed reference log-probs for DPO: one sharded pass of the reference model over the data before training,
stored beside the run and reused on resume, so the train step holds one model, not two.

Lookup by batch index. The loader is deterministic: batch i of a run is a pure function of (data, seed, batch
size, seq_len, packing, process), and a resumed loader continues at exactly the batch an uninterrupted one would.
So `setup` builds the same loaders the run will use, runs the reference over the first `train.steps` train batches
(and the held-out batches evaluation reads), and stores, per batch and per row of this process, the reference's
summed log-prob of every segment. The iterator that `attach` wraps around the run's loader counts its batches (the
count is part of its checkpointed state) and adds batch i's values as `ref_logps`, an array (rows, seq_len) laid out
like the policy's per-(row, segment) sums in dpo.py: row 2k holds the chosen responses' reference log-probs of the
pairs in row pair k, row 2k+1 the rejected ones', column s - 1 segment s. It shares the batch's leading axis, so
the trainer shards and splits it into micro-batches with the rows it belongs to. Every lookup also compares the
stored per-segment token counts with the batch's: data that changed under a store is refused, never mis-paired.

Store: WORKDIR/reference_logps/<fingerprint>/{train,val}-process<p>-of-<n>.npz (numpy arrays, no pickle), one file
per process with that process's rows; `info.json` says what the fingerprint covers. The fingerprint hashes the
reference checkpoint (its resolved path and every file's name, size and mtime), the prepared datasets' manifests
(documents, tokenizer fingerprint), data.weights and the shuffle seed, seq_len, both batch sizes, packing, the
model's compute settings and the process count. The number of batches is not part of it: a store holding at least
as many batches as the run needs is reused (raising train.steps to continue a run computes the store again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dsjax import checkpoint as params_ckpt
from dsjax import sharding as shd
from dsjax.config import model_config
from dsjax.data import pipeline
from dsjax.errors import DataError
from dsjax.train.state import graphdef_of, param_shardings
from dsjax.train.tasks.dpo import load_reference, reference_path, response_logps

STORE_DIR = "reference_logps"


def _files_identity(path: Path) -> list:
    """(relative name, size, mtime_ns) of every file under path: a cheap identity of a checkpoint directory."""
    out = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            p = Path(root) / name
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return sorted(out)


def reference_identity(path) -> dict:
    path = Path(path).expanduser().absolute()
    if params_ckpt.is_hf_dir(path):
        return {"hf_dir": str(path), "files": _files_identity(path)}
    root, step = params_ckpt.find_checkpoint(path)
    return {"checkpoint": str(root / str(step)), "files": _files_identity(root / str(step))}


def fingerprint(config, process_count: int) -> tuple[str, dict]:
    """(hex digest, the JSON-able description it hashes) of everything the stored log-probs depend on."""
    sources = pipeline.resolve_sources(config)
    cfg = dataclasses.asdict(model_config(config))
    described = {
        "reference": reference_identity(reference_path(config)),
        "datasets": [{"dir": str(s.dir.absolute()), "manifest": s.manifest} for s in sources],
        "weights": config.data.weights,
        "seed": config.data.seed if config.data.seed is not None else config.seed,
        "seq_len": config.train.seq_len,
        "global_batch_size": config.train.global_batch_size,
        "eval_batch_size": config.eval.batch_size,
        "packing": bool(config.dpo.packing),
        "model": cfg,
        "process_count": process_count,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, described


def segment_counts(batch: dict) -> np.ndarray:
    """(rows, seq_len) sum of loss_weights per (row, segment), column s - 1 segment s, on the host."""
    rows, seq = batch["segment_ids"].shape
    index = np.arange(rows)[:, None] * (seq + 1) + batch["segment_ids"]
    counts = np.bincount(index.ravel(), weights=batch["loss_weights"].ravel().astype(np.float64),
                         minlength=rows * (seq + 1))
    return counts.reshape(rows, seq + 1)[:, 1:].astype(np.float32)


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order make_array_from_process_local_data
    placed them (each distinct row block once, replicas over other mesh axes skipped)."""
    blocks = {}
    for shard in array.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


@dataclasses.dataclass
class SplitLogps:
    """One split's stored values: logps and counts (batches, local rows, max segments per row)."""

    logps: np.ndarray
    counts: np.ndarray

    @property
    def num_batches(self) -> int:
        return self.logps.shape[0]


class WithReference:
    """The run's loader, each batch i given `ref_logps` (see the module docstring); checkpointable like it."""

    def __init__(self, loader, split: str, stored: SplitLogps, where: Path):
        self.loader, self.split, self.stored, self.where = loader, split, stored, where
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self.index
        if i >= self.stored.num_batches:
            if self.split == "val":  # evaluation reads no further (eval.steps): the held-out pass ends here
                raise StopIteration
            raise DataError(f"{self.where} holds reference log-probs of {self.stored.num_batches} {self.split} "
                            f"batches but the run reads batch {i}; delete it to have it computed again.")
        batch = next(self.loader)
        rows, seq = batch["tokens"].shape
        width = self.stored.logps.shape[2]
        counts = segment_counts(batch)
        if counts[:, width:].any() or not np.array_equal(counts[:, :width], self.stored.counts[i]):
            raise DataError(f"{self.split} batch {i} does not match the reference log-probs stored in {self.where}: "
                            "the data changed under them; delete that directory to have them computed again.")
        ref = np.zeros((rows, seq), np.float32)
        ref[:, :width] = self.stored.logps[i]
        self.index += 1
        return dict(batch, ref_logps=ref)

    def get_state(self) -> dict:
        return {"loader": self.loader.get_state(), "index": self.index}

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state["loader"])
        self.index = state["index"]

    def close(self) -> None:
        if hasattr(self.loader, "close"):
            self.loader.close()


class ReferenceLogps:
    """The stored reference log-probs of a run's train and val batches on this process."""

    def __init__(self, directory: Path, splits: dict[str, SplitLogps]):
        self.directory, self.splits = directory, splits

    def attach(self, loader, split: str) -> WithReference:
        return WithReference(loader, split, self.splits[split], self.directory)

    @staticmethod
    def _file(directory: Path, split: str) -> Path:
        return directory / f"{split}-process{jax.process_index()}-of-{jax.process_count()}.npz"

    @classmethod
    def prepare(cls, task, *, mesh, rules, batch_sharding, workdir, log) -> ReferenceLogps:
        """Loads the store for this run's fingerprint where it covers the run, else computes and writes it."""
        config = task.config
        digest, described = fingerprint(config, jax.process_count())
        directory = Path(workdir) / STORE_DIR / digest
        shares = dict(process_index=jax.process_index(), process_count=jax.process_count())
        # split -> (loader arguments, batches the run reads: train.steps, and what evaluation reads)
        needed = {"train": (dict(global_batch_size=config.train.global_batch_size), config.train.steps)}
        if config.eval.every_steps:
            kw = dict(global_batch_size=config.eval.batch_size, num_epochs=1)
            val = task._loader("val", **kw, **shares)
            needed["val"] = (kw, min(val.num_batches, config.eval.steps or val.num_batches))
            val.close()
        splits = {}
        for split, (_, count) in needed.items():
            path = cls._file(directory, split)
            if path.exists():
                with np.load(path, allow_pickle=False) as f:
                    stored = SplitLogps(f["logps"], f["counts"])
                if stored.num_batches >= count:
                    splits[split] = stored
        counts = lambda: ", ".join(f"{s.num_batches} {k}" for k, s in splits.items())  # noqa: E731
        if len(splits) == len(needed):
            log(f"reference log-probs: reusing {directory} ({counts()} batches)")
            return cls(directory, splits)

        start = time.perf_counter()
        cfg = model_config(config)
        params = load_reference(config, cfg, param_shardings(cfg, mesh, rules))
        graphdef = graphdef_of(cfg)
        fn = jax.jit(lambda p, b: response_logps(nnx.merge(graphdef, p), b)["logps"],
                     in_shardings=(jax.tree.map(lambda a: a.sharding, params), batch_sharding),
                     out_shardings=batch_sharding)
        directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (directory / "info.json").write_text(json.dumps(described, indent=2, sort_keys=True, default=str))
        with shd.use_rules(mesh, rules):
            for split, (kw, count) in needed.items():
                if split not in splits:
                    loader = task._loader(split, **kw, **shares)
                    try:
                        splits[split] = _run_split(fn, params, loader, count, batch_sharding)
                    finally:
                        loader.close()
                    path = cls._file(directory, split)
                    partial = path.with_name(path.name + ".partial.npz")
                    np.savez(partial, logps=splits[split].logps, counts=splits[split].counts)
                    os.replace(partial, path)  # complete or absent, never half written
        log(f"reference log-probs: {counts()} batches of {reference_path(config)} in "
            f"{time.perf_counter() - start:.1f} s, stored in {directory}")
        return cls(directory, splits)


def _run_split(fn, params, loader, count: int, batch_sharding) -> SplitLogps:
    """The reference over the loader's first `count` batches, kept to the widest segment count any row has."""
    logps, counts = [], []
    for _ in range(count):
        local = next(loader)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items()}
        logps.append(_local_rows(fn(params, batch)))
        counts.append(segment_counts(local))
    width = max(1, max(int(np.max(np.flatnonzero(c.any(0)), initial=-1)) + 1 for c in counts))
    return SplitLogps(np.stack([x[:, :width] for x in logps]), np.stack([c[:, :width] for c in counts]))
