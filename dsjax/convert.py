"""Checkpoint conversion CLI.

  python -m dsjax.convert import-hf SRC DST   # Hugging Face LlamaForCausalLM safetensors dir -> dsjax checkpoint
  python -m dsjax.convert export-hf SRC DST   # dsjax workdir / checkpoint root / step dir -> HF safetensors dir

Options: --dtype (parameter dtype written; default: as stored), --overwrite (replace a non-empty DST).
Errors a user can cause end with one sentence on stderr and exit code 2; nothing half-written is left at DST.

export-hf of a model too large for one host's memory: run it on every host with --distributed (and, off TPU pods,
SLURM and Open MPI, --coordinator_address --num_processes --process_id, as dsjax.main takes them); the parameters are
restored split over all devices (FSDP), gathered one tensor at a time, and written by process 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax

from dsjax import checkpoint, distributed
from dsjax.errors import CheckpointError, CheckpointNotFound, ConfigError, DataError
from dsjax.interop import hf, sentencepiece_hf
from dsjax.data import chat
from dsjax.data.tokenizer import load_tokenizer
from dsjax.model import param_count


def import_hf(src, dst, dtype=None, overwrite=False):
    model = hf.load_model(src, dtype=dtype)
    hf_config = json.loads((Path(src) / "config.json").read_text())
    special = {k: hf_config[f"{k[:3]}_token_id"] for k in ("bos_id", "eos_id") if f"{k[:3]}_token_id" in hf_config}
    path = checkpoint.save_params(model, dst, overwrite=overwrite, meta={"source": f"hf:{src}", "tokenizer": special})
    for name in ("tokenizer.json", "tokenizer_config.json"):  # generation and evaluation find it beside the model
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
    print(f"imported {param_count(model):,} parameters from {src} into {path}")


def special_ids(src) -> tuple[int | None, int | None]:
    """bos and eos ids of the model at `src`: recorded in its meta, else read from the tokenizer beside it."""
    recorded = checkpoint.checkpoint_meta(src).get("tokenizer") or {}
    if recorded.get("bos_id") is not None:
        return recorded["bos_id"], recorded.get("eos_id")
    found = checkpoint.find_tokenizer(src)
    if found is None:
        return None, None
    tok = load_tokenizer(found)
    return tok.bos_id, tok.eos_id


def tokenizer_files(src, model_config) -> dict[str, bytes]:
    """tokenizer.json and a tokenizer_config.json with the DeepSeek chat template, so that transformers'
    AutoTokenizer, apply_chat_template and generate work on the export. A Hugging Face tokenizer.json carries over
    as it is; a sentencepiece tokenizer.model (the built-in corpus's) is converted into an equivalent tokenizer.json
    (interop/sentencepiece_hf.py), which refuses rather than give other ids. Where the model's vocab is padded past
    the tokenizer's, a generation_config.json suppresses the padding ids, which dsjax.generate never samples."""
    found = checkpoint.find_tokenizer(src)
    if found is None:
        return {}
    tok = load_tokenizer(found)
    if found.suffix == ".model":
        try:
            hf_tok = sentencepiece_hf.convert(found)
        except DataError as err:  # a model outside dsjax's recipe: the weights still export, without it
            if jax.process_index() == 0:
                print(f"warning: {err} The model is exported without a tokenizer.", file=sys.stderr)
            return {}
        tokenizer_json, token_name = sentencepiece_hf.serialize(hf_tok), hf_tok.id_to_token
    else:
        tokenizer_json, token_name = found.read_bytes(), tok.token_name
    beside = found.parent / "tokenizer_config.json"
    config = json.loads(beside.read_text()) if beside.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", model_config.max_seq_len)
    for role in ("bos", "eos", "pad"):
        config.setdefault(f"{role}_token", token_name(getattr(tok, f"{role}_id")))
    config.setdefault("chat_template", chat.JINJA_TEMPLATE)
    files = {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2).encode()}
    if model_config.vocab_size > tok.vocab_size:
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                      "suppress_tokens": list(range(tok.vocab_size, model_config.vocab_size))}
        files["generation_config.json"] = json.dumps(generation).encode()
    return files


def export_hf(src, dst, dtype=None, overwrite=False):
    # Before the (possibly long) restore. A tokenizer file that does not load stops the export (one sentence); a
    # sentencepiece model that does not convert exactly is left out with a warning rather than changed.
    extra = tokenizer_files(src, checkpoint.checkpoint_config(src))
    model = checkpoint.restore_model(src, shardings=_split_over_all_devices(src))
    bos, eos = special_ids(src)
    path = hf.save_model(model, dst, dtype=dtype, overwrite=overwrite, bos_token_id=bos, eos_token_id=eos,
                         extra_files=extra)
    note = " with its tokenizer and chat template" if extra else " without a tokenizer"
    if jax.process_index() == 0:
        print(f"exported {param_count(model):,} parameters from {src} to {path}{note}")


def _split_over_all_devices(src):
    """Multi-process: every parameter split over the devices of all processes (FSDP rules), so no host holds
    the model whole; None (the first device) on one process."""
    if jax.process_count() == 1:
        return None
    from dsjax import sharding
    from dsjax.model import abstract_model
    from dsjax.model.params import shardings

    mesh = sharding.make_mesh((1, -1, 1))
    return shardings(abstract_model(checkpoint.checkpoint_config(src)), mesh, sharding.DEFAULT_RULES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["import-hf", "export-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--distributed", action="store_true", help="export-hf on several processes (see above)")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)
    run = import_hf if args.command == "import-hf" else export_hf
    try:
        distributed.check_flags(args.distributed, args.coordinator_address, args.num_processes, args.process_id)
        if args.distributed:
            if args.command == "import-hf":
                raise ConfigError("--distributed is for export-hf; import-hf runs on one process.")
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        run(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, CheckpointNotFound, FileExistsError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
