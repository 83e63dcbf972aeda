"""The decoder against oracles: Hugging Face Llama layers (torch, CPU), unpacked runs, hand-computed counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf_llama

from dsjax.config import load_config, model_config
from dsjax.model import ConfigError, ModelConfig, abstract_model, init_model, param_count
from dsjax.model.attention_ops import dot_product_attention, xla_attention
from dsjax.model.mlp import MLP
from dsjax.model.norm import RMSNorm
from dsjax.model.params import logical_axes
from dsjax.model.rope import apply_rope, rope_angles

SMALL = ModelConfig(vocab_size=203, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=80, max_seq_len=64)


def test_rmsnorm_matches_hf():
    x = np.random.RandomState(0).randn(2, 5, 48).astype(np.float32)
    gain = np.random.RandomState(1).randn(48).astype(np.float32)
    ref = hf_llama.LlamaRMSNorm(48, eps=1e-6)
    ref.weight.data = torch.tensor(gain)
    norm = RMSNorm(48, 1e-6, jnp.float32)
    norm.weight[...] = jnp.asarray(gain)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref(torch.tensor(x)).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_rope_matches_hf_rotate_half():
    rs = np.random.RandomState(0)
    q = rs.randn(2, 7, 3, 16).astype(np.float32)
    positions = np.stack([np.arange(7), np.array([0, 1, 2, 0, 1, 2, 3])]).astype(np.int32)
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=3, rope_theta=10000.0)
    rotary = hf_llama.LlamaRotaryEmbedding(cfg)
    cos_t, sin_t = rotary(torch.tensor(q), torch.tensor(positions))
    q_t = torch.tensor(q).transpose(1, 2)  # HF uses (batch, heads, seq, dim)
    ref, _ = hf_llama.apply_rotary_pos_emb(q_t, q_t, cos_t, sin_t)
    cos, sin = rope_angles(jnp.asarray(positions), 16, 10000.0)
    out = apply_rope(jnp.asarray(q), cos, sin)
    np.testing.assert_allclose(out, ref.transpose(1, 2).numpy(), atol=1e-5)


def test_mlp_matches_hf_swiglu():
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, intermediate_size=80, hidden_act="silu", mlp_bias=False)
    torch.manual_seed(0)
    ref = hf_llama.LlamaMLP(cfg)
    mlp = MLP(SMALL, nnx.Rngs(0))
    mlp.gate_proj[...] = jnp.asarray(ref.gate_proj.weight.detach().numpy().T)
    mlp.up_proj[...] = jnp.asarray(ref.up_proj.weight.detach().numpy().T)
    mlp.down_proj[...] = jnp.asarray(ref.down_proj.weight.detach().numpy().T)
    x = np.random.RandomState(0).randn(2, 5, 48).astype(np.float32)
    np.testing.assert_allclose(mlp(jnp.asarray(x)), ref(torch.tensor(x)).detach().numpy(), atol=1e-5)


def _naive_attention(q, k, v, segment_ids, causal):
    """Per-head loops with K/V repeated per group: the textbook definition."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, :, hi] @ k[bi, :, hi // group].T / np.sqrt(d)
            allowed = np.ones((s, s), bool)
            if causal:
                allowed &= np.tril(np.ones((s, s), bool))
            if segment_ids is not None:
                allowed &= segment_ids[bi][:, None] == segment_ids[bi][None, :]
            scores = np.where(allowed, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // group]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_xla_attention_matches_naive(causal, kv_heads, packed):
    rs = np.random.RandomState(0)
    q = rs.randn(2, 9, 4, 8).astype(np.float32)
    k = rs.randn(2, 9, kv_heads, 8).astype(np.float32)
    v = rs.randn(2, 9, kv_heads, 8).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2, 2, 0]]) if packed else None
    out = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if seg is None else jnp.asarray(seg),
                        causal=causal)
    np.testing.assert_allclose(out, _naive_attention(q, k, v, seg, causal), atol=1e-5)


def test_packed_row_equals_documents_run_alone():
    model = init_model(SMALL.replace(init_std=0.2), seed=1)
    rs = np.random.RandomState(0)
    doc_a, doc_b = rs.randint(0, 203, 5), rs.randint(0, 203, 7)
    tokens = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    packed = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    alone_a = model(jnp.asarray(doc_a[None]))
    alone_b = model(jnp.asarray(doc_b[None]))
    np.testing.assert_allclose(packed[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:], alone_b[0], atol=1e-5)


def _counted_params(vocab, d, layers, heads, kv_heads, d_ff):
    head_dim = d // heads
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    per_layer = attn + 3 * d * d_ff + 2 * d
    return 2 * vocab * d + layers * per_layer + d


@pytest.mark.parametrize(
    "name,expected,billions",
    [("7b", _counted_params(102400, 4096, 30, 32, 32, 11008), "6.910"),
     ("67b", _counted_params(102400, 8192, 95, 64, 8, 22016), "67.43")],
)
def test_paper_parameter_counts(name, expected, billions):
    cfg = model_config(load_config(name))
    count = param_count(abstract_model(cfg))
    assert count == expected
    assert f"{count / 1e9:.{len(billions.split('.')[1])}f}" == billions


@pytest.mark.parametrize("name", ["7b", "67b"])
def test_paper_configs_init_and_forward_abstractly(name):
    cfg = model_config(load_config(name))
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, cfg.max_seq_len), jnp.int32)
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
    assert logits.shape == (1, cfg.max_seq_len, 102400) and logits.dtype == jnp.float32
    assert state["layers"]["attn"]["k_proj"].shape == (cfg.n_layers, cfg.d_model, cfg.n_kv_heads, 128)


def _count_dots(cfg):
    graphdef, state = nnx.split(abstract_model(cfg))
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    text = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).as_text()
    return text.count("dot_general")


def test_depth_is_scanned_not_unrolled():
    """The 95-layer 67B lowers to the same program size as a 2-layer model of the same width (layer_loop=scan,
    what auto picks on GPU/TPU); unrolled, each layer adds its own products."""
    cfg = model_config(load_config("67b")).replace(layer_loop="scan")
    assert _count_dots(cfg) == _count_dots(cfg.replace(n_layers=2))
    unrolled = [_count_dots(cfg.replace(layer_loop="unrolled", n_layers=n)) for n in (1, 2, 3)]
    assert unrolled[2] - unrolled[1] == unrolled[1] - unrolled[0] > 0


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_the_scan(remat):
    """auto unrolls on this CPU: no while loop in the program, and logits and gradients equal the scan's."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 203, (2, 12)))

    def run(cfg):
        graphdef, state = nnx.split(init_model(cfg, seed=3))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
        program = jax.jit(jax.grad(loss)).lower(state).as_text()
        return jax.value_and_grad(loss)(state), "while" in program

    (ref_loss, ref), ref_loops = run(SMALL.replace(remat=remat, layer_loop="scan"))
    (loss, got), loops = run(SMALL.replace(remat=remat))
    assert jax.default_backend() == "cpu" and SMALL.layer_loop == "auto" and ref_loops and not loops
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_every_parameter_has_logical_axes():
    allowed = {"layers", "vocab", "embed_vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(SMALL), nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == var.get_value().ndim and set(axes) <= allowed, (path, axes)
        assert ("layers" in axes) == (path[0] == "layers")


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_identical_gradients(policy):
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 203, (2, 12)))

    def grads(cfg):
        model = init_model(cfg, seed=3)
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
        return jax.grad(loss)(state)

    ref, got = grads(SMALL), grads(SMALL.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_init_std_is_the_papers():
    model = init_model(SMALL.replace(d_model=384, n_heads=6, d_ff=1024), seed=0)
    assert abs(float(jnp.std(model.layers.mlp.up_proj[...])) - 0.006) < 0.006 * 0.02
    assert float(jnp.std(model.layers.input_norm.weight[...])) == 0.0


def test_bf16_compute_keeps_float32_logits_and_params():
    model = init_model(SMALL.replace(dtype="bfloat16"), seed=0)
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
    assert model.embed[...].dtype == jnp.float32
    ref = init_model(SMALL, seed=0)(jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(logits, ref, atol=5e-2)
    half = init_model(SMALL.replace(param_dtype="bfloat16"), seed=0)
    assert half.lm_head[...].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(n_heads=6, n_kv_heads=4), "model.n_heads=6 is not divisible by model.n_kv_heads=4"),
        (dict(d_model=50), "model.d_model=50 is not divisible by model.n_heads=6"),
        (dict(d_ff=0), "model.d_ff must be a positive integer"),
        (dict(vocab_size=-3), "model.vocab_size must be a positive integer"),
        (dict(attention="flash"), "model.attention='flash' is not one of"),
        (dict(remat="some"), "model.remat='some' is not one of"),
        (dict(layer_loop="loop"), "model.layer_loop='loop' is not one of"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        SMALL.replace(**changes)


def test_config_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dsjax.config import default_config\n"
                   "def get_config():\n    c = default_config()\n    c.model.n_kv_heads = 5\n    return c\n")
    with pytest.raises(ConfigError, match="model.n_heads=32 is not divisible by model.n_kv_heads=5"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="'nope' is neither a file nor one of the named configs"):
        load_config("nope")
    cfg = load_config("tiny")
    with pytest.raises(AttributeError):
        cfg.model.n_kv_head = 2  # locked: a misspelt key is an error, not a new field


def test_cudnn_attention_refused_off_gpu():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs an NVIDIA GPU"):
        dot_product_attention(q, q, q, backend="cudnn")


def test_input_shape_errors_name_the_tensor():
    model = init_model(SMALL, seed=0)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 3\) but tokens have shape \(1, 4\)"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model(jnp.zeros((1, 4), jnp.float32))
