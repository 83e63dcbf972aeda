"""What every evaluation needs: the model placed on a mesh, its tokenizer, and the rules to trace under.

A model is read straight onto the mesh (each parameter built with its sharding, never whole on one device first),
from a dsjax checkpoint, a training workdir or a Hugging Face directory alike (`dsjax.checkpoint.load_model`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jax.sharding import Mesh

from dsjax import checkpoint
from dsjax import sharding as shd
from dsjax.data.tokenizer import Tokenizer, load_tokenizer
from dsjax.errors import CheckpointNotFound, DataError
from dsjax.model import ModelConfig, Transformer, abstract_model
from dsjax.model import params as model_params


@dataclasses.dataclass
class Runtime:
    """A loaded model with its tokenizer and mesh; what the scorer and every task take."""

    model: Transformer
    tokenizer: Tokenizer
    mesh: Mesh
    rules: tuple
    checkpoint: str

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len


def model_config(path) -> ModelConfig:
    """The ModelConfig at `path` without reading any weights (to compute shardings before loading)."""
    path = Path(path).expanduser()
    try:
        return checkpoint.checkpoint_config(path)
    except CheckpointNotFound:
        raise CheckpointNotFound(
            f"--checkpoint={path} is neither a dsjax checkpoint (workdir, root or step directory) nor a Hugging Face "
            "model directory (config.json beside *.safetensors)."
        ) from None


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules) -> dict:
    """NamedShardings for `params_dict(model)`, from the logical axes each parameter carries."""
    return model_params.shardings(abstract_model(cfg), mesh, rules)


def load(path, *, tokenizer=None, mesh_shape=(-1, 1, 1), rules=shd.DEFAULT_RULES, **overrides) -> Runtime:
    """The model at `path` on a mesh of `mesh_shape` (data, fsdp, tensor), with its tokenizer.

    tokenizer: a tokenizer file or directory; default: the one `dsjax.checkpoint.find_tokenizer` finds.
    overrides: runtime ModelConfig fields (attention, dtype, param_dtype).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFound(f"--checkpoint={path} does not exist.")
    cfg = model_config(path)
    mesh = shd.make_mesh(mesh_shape)
    rules = tuple(tuple(r) for r in rules)
    model = checkpoint.load_model(path, shardings=param_shardings(cfg, mesh, rules), **overrides)
    if tokenizer is None:
        tokenizer = checkpoint.find_tokenizer(path)
        if tokenizer is None:
            raise DataError(f"found no tokenizer.json or tokenizer.model for --checkpoint={path}; pass --tokenizer.")
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise DataError(
            f"the tokenizer {tok.path} has {tok.vocab_size} tokens but the model at {path} only "
            f"{model.config.vocab_size}; they do not belong together."
        )
    return Runtime(model=model, tokenizer=tok, mesh=mesh, rules=rules, checkpoint=str(path))
