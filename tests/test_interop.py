"""Hugging Face interop against `transformers` itself: logits, round trips, the convert CLI, bad checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.interop.hf import CheckpointError, load_model, save_model
from dsjax import checkpoint

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    # GQA with odd sizes: 6 query heads over 2 kv heads, head_dim 12, vocab and FFN not multiples of anything.
    "gqa_odd": dict(vocab_size=257, hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2),
    # Plain multi-head attention, as in DeepSeek 7B.
    "mha": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4),
}


def make_hf(shape, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a mix-up of the two norms shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def params_of(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("shard_size", [None, "40KB"])
def test_import_matches_transformers_logits(tmp_path, shape, shard_size):
    hf = make_hf(shape)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_size)
    model = load_model(tmp_path)
    tokens = np.random.RandomState(0).randint(0, SHAPES[shape]["vocab_size"], (2, 19))
    logits = model(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 19, SHAPES[shape]["vocab_size"])
    np.testing.assert_allclose(logits, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_dsjax_to_hf_to_dsjax_is_bit_exact(tmp_path):
    hf = make_hf("gqa_odd")
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    again = load_model(tmp_path / "out")
    for a, b in zip(params_of(model), params_of(again)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # transformers itself reads the export and computes the same logits as the original.
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.RandomState(1).randint(0, 257, (1, 11))
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(hf, tokens))


def test_load_directly_onto_a_mesh(tmp_path):
    hf = make_hf("gqa_odd")
    hf.save_pretrained(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    shardings = {
        ("embed",): NamedSharding(mesh, PartitionSpec(None, "fsdp")),
        ("layers", "mlp", "up_proj"): NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor")),
        ("layers", "attn", "q_proj"): NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor")),
    }
    sharded = load_model(tmp_path, shardings=shardings)
    plain = load_model(tmp_path)
    assert sharded.layers.mlp.up_proj[...].sharding == shardings[("layers", "mlp", "up_proj")]
    for a, b in zip(params_of(sharded), params_of(plain)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_import(tmp_path):
    hf = make_hf("mha")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    ref = hf.lm_head.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.lm_head[...], np.float32), ref)


def test_convert_cli_round_trip(tmp_path):
    hf = make_hf("gqa_odd")
    hf.save_pretrained(tmp_path / "hf")
    run = lambda *args: subprocess.run([sys.executable, "-m", "dsjax.convert", *map(str, args)], cwd=REPO,
                                       capture_output=True, text=True)
    done = run("import-hf", tmp_path / "hf", tmp_path / "ck")
    assert done.returncode == 0, done.stderr
    restored = checkpoint.restore_model(tmp_path / "ck")
    for a, b in zip(params_of(restored), params_of(load_model(tmp_path / "hf"))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    done = run("export-hf", tmp_path / "ck", tmp_path / "back")
    assert done.returncode == 0, done.stderr
    tokens = np.random.RandomState(2).randint(0, 257, (1, 9))
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(hf, tokens))
    # A second export to the same place is refused, and the first one is untouched.
    done = run("export-hf", tmp_path / "ck", tmp_path / "back")
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "back" / "config.json").exists()
    done = run("export-hf", tmp_path / "nowhere", tmp_path / "x")
    assert done.returncode == 2 and "does not exist" in done.stderr


def _edit_single_file(path: Path, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_get_clear_errors(tmp_path):
    hf = make_hf("mha")
    hf.save_pretrained(tmp_path)

    _edit_single_file(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(tmp_path)

    hf.save_pretrained(tmp_path)
    _edit_single_file(tmp_path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' in model.safetensors has shape "
                                              r"\(95, 64\), but config.json implies \(96, 64\)"):
        load_model(tmp_path)

    hf.save_pretrained(tmp_path)
    _edit_single_file(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.q_norm.weight', which a LlamaForCausalLM"):
        load_model(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=True is not supported"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused_never_loaded(tmp_path):
    hf = make_hf("mha")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights .pytorch_model.bin.; dsjax never loads pickle"):
        load_model(tmp_path)


def test_save_refuses_to_overwrite(tmp_path):
    hf = make_hf("mha")
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty; pass --overwrite"):
        save_model(model, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no partial directory left behind
