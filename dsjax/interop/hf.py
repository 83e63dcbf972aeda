"""Hugging Face LlamaForCausalLM safetensors <-> dsjax Transformer, one tensor at a time.

DeepSeek LLM 7B/67B base and chat are released in this layout. Both directions stream tensor by tensor, so a 67B
never exists twice in host memory: loading builds each (possibly sharded) parameter straight from the files with
`jax.make_array_from_callback`; saving fetches one layer's weight at a time and writes shards of bounded size.

HF stores a linear layer as (out_features, in_features); dsjax stores (in, out) with heads split out, e.g.
q_proj (heads*head_dim, d_model) <-> (d_model, heads, head_dim). Rotary embeddings use the same rotate-half
convention on both sides, so no permutation of q/k rows is needed. Pickle (`.bin`) checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from dsjax.errors import CheckpointError
from dsjax.model import ModelConfig, Transformer, abstract_model


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One dsjax parameter and its HF tensor. `in_dims` leading dsjax dims form HF's input (second) axis."""

    path: tuple[str, ...]
    hf_name: str  # "{i}" is the layer index for stacked per-layer weights
    in_dims: int | None  # None: same layout on both sides (embeddings, norm gains)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


TENSOR_MAPS = (
    TensorMap(("embed",), "model.embed_tokens.weight", None),
    TensorMap(("layers", "attn", "q_proj"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    TensorMap(("layers", "attn", "k_proj"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    TensorMap(("layers", "attn", "v_proj"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    TensorMap(("layers", "attn", "o_proj"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    TensorMap(("layers", "mlp", "gate_proj"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    TensorMap(("layers", "mlp", "up_proj"), "model.layers.{i}.mlp.up_proj.weight", 1),
    TensorMap(("layers", "mlp", "down_proj"), "model.layers.{i}.mlp.down_proj.weight", 1),
    TensorMap(("layers", "input_norm", "weight"), "model.layers.{i}.input_layernorm.weight", None),
    TensorMap(("layers", "post_attn_norm", "weight"), "model.layers.{i}.post_attention_layernorm.weight", None),
    TensorMap(("final_norm", "weight"), "model.norm.weight", None),
    TensorMap(("lm_head",), "lm_head.weight", 1),
)

# Buffers older exports carry that are derived from the config, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shape(dsjax_shape: tuple[int, ...], in_dims: int | None) -> tuple[int, ...]:
    if in_dims is None:
        return tuple(dsjax_shape)
    return (math.prod(dsjax_shape[in_dims:]), math.prod(dsjax_shape[:in_dims]))


def to_dsjax(tensor: np.ndarray, shape: tuple[int, ...], in_dims: int | None) -> np.ndarray:
    return tensor if in_dims is None else tensor.T.reshape(shape)


def to_hf(array: np.ndarray, in_dims: int | None) -> np.ndarray:
    if in_dims is None:
        return array
    return np.ascontiguousarray(array.reshape(hf_shape(array.shape, in_dims)[::-1]).T)


# ----------------------------------------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json; refuses features the DeepSeek decoder does not have."""
    archs = hf_config.get("architectures") or []
    if "LlamaForCausalLM" not in archs and hf_config.get("model_type") != "llama":
        raise CheckpointError(f"{source}: architectures={archs} is not LlamaForCausalLM, the DeepSeek LLM layout.")
    checks = {
        "hidden_act": ("silu", hf_config.get("hidden_act", "silu")),
        "attention_bias": (False, hf_config.get("attention_bias", False)),
        "mlp_bias": (False, hf_config.get("mlp_bias", False)),
        "tie_word_embeddings": (False, hf_config.get("tie_word_embeddings", False)),
    }
    for key, (want, got) in checks.items():
        if got != want:
            raise CheckpointError(f"{source}: {key}={got!r} is not supported (DeepSeek LLM uses {want!r}).")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope scaling {rope_type!r} is not supported (DeepSeek LLM uses none).")
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    if head_dim * heads != hf_config["hidden_size"]:
        raise CheckpointError(
            f"{source}: head_dim={head_dim} times num_attention_heads={heads} is not hidden_size="
            f"{hf_config['hidden_size']}; dsjax derives head_dim from d_model."
        )
    values = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["hidden_size"],
        n_layers=hf_config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or heads,
        d_ff=hf_config["intermediate_size"],
        max_seq_len=hf_config.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
    )
    values.update(overrides)
    return ModelConfig(**values)


def config_to_hf(cfg: ModelConfig, torch_dtype: str, bos_token_id=None, eos_token_id=None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


# ------------------------------------------------------------------------------------------------------------- load


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index json or the single model.safetensors."""
    pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise CheckpointError(f"{index} lists {path.name}, which is not in {hf_dir}.")
        return files
    if single.exists():
        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    if pickles:
        raise CheckpointError(
            f"{hf_dir} holds only pickle weights ({pickles[0]}); dsjax never loads pickle. Convert them to "
            "safetensors first (e.g. transformers' save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json.")


class _Reader:
    """Keeps each safetensors file open once and reads tensors by name."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="numpy").__enter__()
        return self.handles[path]

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _expected_names(cfg: ModelConfig) -> list[str]:
    names = []
    for tmap in TENSOR_MAPS:
        if tmap.stacked:
            names += [tmap.hf_name.format(i=i) for i in range(cfg.n_layers)]
        else:
            names.append(tmap.hf_name)
    return names


def _param_paths(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(str(k) for k in path): var.get_value() for path, var in flat}


def load_model(hf_dir, dtype=None, *, shardings=None, compute_dtype=None, **overrides) -> Transformer:
    """Reads a LlamaForCausalLM safetensors checkpoint into a dsjax Transformer.

    dtype: parameter dtype (default float32); compute_dtype: ModelConfig.dtype (default auto). shardings: optional
    {param path tuple: jax.sharding.Sharding} to place each parameter directly on a mesh. overrides: other
    ModelConfig fields such as attention="pallas".
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    if compute_dtype is not None:
        overrides["dtype"] = compute_dtype
    cfg = config_from_hf(json.loads(config_path.read_text()), str(config_path), **overrides)
    files = _tensor_files(hf_dir)
    expected = _expected_names(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"{hf_dir} is missing tensor {missing[0]!r} (and {len(missing) - 1} more).")
    unknown = sorted(n for n in files if n not in set(expected) and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise CheckpointError(
            f"{files[unknown[0]].name} has tensor {unknown[0]!r}, which a LlamaForCausalLM checkpoint does not have."
        )

    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    shapes = _param_paths(abstract)
    reader = _Reader(files)
    try:
        loaded = {}
        for tmap in TENSOR_MAPS:
            spec = shapes[tmap.path]
            loaded[tmap.path] = _load_param(reader, tmap, spec, cfg, shardings)
    finally:
        reader.close()
    pure = {}
    for path, value in loaded.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _load_param(reader: _Reader, tmap: TensorMap, spec, cfg: ModelConfig, shardings):
    layer_shape = spec.shape[1:] if tmap.stacked else spec.shape
    want = hf_shape(layer_shape, tmap.in_dims)
    names = [tmap.hf_name.format(i=i) for i in range(cfg.n_layers)] if tmap.stacked else [tmap.hf_name]
    for name in names:
        got = reader.shape(name)
        if got != want:
            raise CheckpointError(
                f"tensor {name!r} in {reader.files[name].name} has shape {got}, but config.json implies {want}."
            )

    def read(name):
        return to_dsjax(reader.read(name), layer_shape, tmap.in_dims).astype(spec.dtype)

    def shard(index):
        if not tmap.stacked:
            return np.asarray(read(names[0])[index])
        layers = range(cfg.n_layers)[index[0]]
        return np.stack([read(names[i])[index[1:]] for i in layers])

    sharding = (shardings or {}).get(tmap.path) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(spec.shape, sharding, shard)


# ------------------------------------------------------------------------------------------------------------- save


def save_model(
    model: Transformer,
    out_dir,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    bos_token_id=None,
    eos_token_id=None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Writes `model` as a LlamaForCausalLM safetensors checkpoint loadable by `from_pretrained`.

    Tensors are fetched and converted one (layer) at a time and written in shards of at most `max_shard_bytes`.
    The directory appears only once complete (written beside it, then renamed); an existing non-empty `out_dir`
    is refused unless `overwrite`. extra_files: {name: content} written beside the weights (the tokenizer).
    Multi-process (arrays no process holds whole): every process calls it and takes part in gathering each tensor
    (`multihost_utils.process_allgather`, one at a time, so a host holds one tensor more than its shards); process
    0 alone writes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it.")
    cfg = model.config
    out_dtype = jnp.dtype(dtype or cfg.weight_dtype)
    params = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    entries = []  # (hf name, fetch function, nbytes) in HF order
    for tmap in TENSOR_MAPS:
        value = params[tmap.path].get_value()
        if tmap.stacked:
            for i in range(cfg.n_layers):
                entries.append((tmap.hf_name.format(i=i), tmap, value, i))
        else:
            entries.append((tmap.hf_name, tmap, value, None))

    shards, current, size = [], [], 0
    for entry in entries:
        value, layer = entry[2], entry[3]
        nbytes = math.prod(value.shape[1:] if layer is not None else value.shape) * out_dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)

    if jax.process_index() > 0:  # gather with process 0, which writes
        for _, _, value, layer in entries:
            _fetch(value, layer)
        _barrier("dsjax-save-hf")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, tmap, value, layer in shard:
                host = _fetch(value, layer)
                tensors[name] = to_hf(host, tmap.in_dims).astype(out_dtype)
                weight_map[name] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            total = sum(math.prod(e[2].shape[1:] if e[3] is not None else e[2].shape) for e in entries)
            index = {"metadata": {"total_size": total * out_dtype.itemsize}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = config_to_hf(cfg, out_dtype.name, bos_token_id, eos_token_id)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name, data in (extra_files or {}).items():  # the tokenizer files, published with the weights
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published directory gets the usual mode
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier("dsjax-save-hf")
    return out_dir


def _fetch(value: jax.Array, layer: int | None) -> np.ndarray:
    """One tensor (one layer's slice of a stacked one) on the host, gathered from every process if need be."""
    piece = value[layer] if layer is not None else value
    if getattr(piece, "is_fully_addressable", True):
        return np.asarray(jax.device_get(piece))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(piece, tiled=True))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
