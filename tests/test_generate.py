"""The KV-cache generator against oracles: transformers `generate`, the full forward pass, HF's logits processors."""

import ast
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from flax import nnx
from transformers.generation import logits_process as hf_lp

from dsjax import sharding
from dsjax.data.tokenizer import BOS, EOS, load_tokenizer
from dsjax.errors import ConfigError
from dsjax.generate import Generator, SamplingParams, generate, shard_model
from dsjax.generate import generator
from dsjax.generate import sampling as S
from dsjax.generate.chat import chat_prompt_ids, render_chat, stream_reply
from dsjax.interop.hf import load_model
from dsjax.model.transformer import unstack_layers

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_VOCAB = 300  # the model's vocab is padded above it: ids 300..319 must never come out
CONTEXT = 64
SHAPES = {
    "gqa": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
    "mha": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4),
}
TEXT = (
    "def greet(name):\n    return 'Hello, ' + name\n\nclass Point:\n    def __init__(self, x, y):\n"
    "        self.x = x\n        self.y = y\n\nfor i in range(10):\n    print(greet(str(i)))\n"
) * 20


def train_tokenizer(path: Path):
    """A byte-level BPE of TOKENIZER_VOCAB ids, DeepSeek's bos/eos as ids 0 and 1."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path))
    return load_tokenizer(path)


def make_hf_dir(path: Path, shape: str = "gqa", seed: int = 0) -> Path:
    """A random LlamaForCausalLM (float32) with its tokenizer.json, as a Hugging Face model directory."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(path / "tokenizer.json")
    assert tokenizer.vocab_size == TOKENIZER_VOCAB and (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], vocab_size=320, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return {shape: make_hf_dir(root / shape, shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def gqa(hf_dirs):
    path = hf_dirs["gqa"]
    return load_model(path), load_tokenizer(path / "tokenizer.json")


def random_prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [[0] + rs.randint(2, TOKENIZER_VOCAB, n - 1).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens):
    """transformers' own greedy decode of one prompt, padded ids suppressed, cut after eos."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=1, pad_token_id=1,
                          suppress_tokens=list(range(TOKENIZER_VOCAB, 320)))
    new = out[0, len(prompt):].tolist()
    return new[: new.index(1) + 1] if 1 in new else new


def with_eos(completion):
    return completion.ids + ([1] if completion.finish_reason == "eos" else [])


@functools.lru_cache
def _forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def last_logits(model, seq):
    """The full forward pass (no cache) over seq, padded to the context (causal: padding after it is unseen)."""
    graphdef, state = nnx.split(model)
    tokens = np.zeros((1, CONTEXT), np.int32)
    tokens[0, : len(seq)] = seq
    return np.asarray(_forward(graphdef)(state, tokens)[0, len(seq) - 1])


def full_forward_greedy(model, prompt, max_new_tokens, eos=1):
    """The oracle without a cache: re-run the whole sequence for every token."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(np.argmax(last_logits(model, seq)[:TOKENIZER_VOCAB]))
        new.append(token)
        if token == eos:
            break
        seq.append(token)
    return new


# ------------------------------------------------------------------------------------------ against transformers


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_matches_transformers_generate(hf_dirs, shape):
    path = hf_dirs[shape]
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model, tokenizer = load_model(path), load_tokenizer(path / "tokenizer.json")
    new = 6
    # Unequal lengths in one batch, one of them filling the context up to the last generated token.
    prompts = random_prompts([3, 11, 20, CONTEXT - new], seed=1)
    result = generate(model, tokenizer, prompts, max_new_tokens=new)
    for prompt, completion in zip(prompts, result):
        assert with_eos(completion) == hf_greedy(hf, prompt, new)


@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked_slices", "unstacked_layers"])
def test_cached_decode_logits_equal_full_forward(gqa, unstacked):
    model, _ = gqa
    layers = unstack_layers(model) if unstacked else None
    rs = np.random.RandomState(2)
    lengths = np.array([5, 12], np.int32)
    steps = 6
    seqs = rs.randint(2, TOKENIZER_VOCAB, (2, 12 + steps)).astype(np.int32)
    tokens = np.zeros((2, 16), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = seqs[b, :n]
    logits, cache = jax.jit(model.prefill, static_argnums=2)(tokens, lengths, 32, layers)
    decode = jax.jit(model.decode)
    for step in range(steps + 1):
        for b, n in enumerate(lengths):
            full = last_logits(model, seqs[b, : n + step])
            # float32 rounding of two different programs; a stale or misplaced cache entry is off by far more.
            np.testing.assert_allclose(logits[b], full, atol=3e-5, rtol=0)
        if step == steps:
            break
        feed = seqs[np.arange(2), lengths + step]
        logits, cache = decode(jnp.asarray(feed), cache, jnp.asarray(lengths + step), layers)


def test_alone_equals_in_batch(gqa):
    model, tokenizer = gqa
    prompts = random_prompts([4, 14, 9], seed=3)
    batch = generate(model, tokenizer, prompts, max_new_tokens=10).ids
    alone = generate(model, tokenizer, [prompts[1]], max_new_tokens=10).ids
    assert alone[0] == batch[1]
    assert batch[1] == full_forward_greedy(model, prompts[1], 10)[: len(batch[1])]


# ----------------------------------------------------------------------------------------------------- sampling


def test_seed_reproducible_and_top_k_one_is_greedy(gqa):
    model, tokenizer = gqa
    prompts = random_prompts([6, 13], seed=4)
    gen = Generator(model, tokenizer)
    hot = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    first = gen.generate(prompts, seed=7, **hot).ids
    assert gen.generate(prompts, seed=7, **hot).ids == first
    assert gen.generate(prompts, seed=8, **hot).ids != first
    # Chunked decoding (as with stop strings) draws the same tokens: keys depend on the step, not the chunking.
    assert gen.generate(prompts, seed=7, stop=["\x00never"], **hot).ids == first
    greedy = gen.generate(prompts, max_new_tokens=12).ids
    assert gen.generate(prompts, max_new_tokens=12, temperature=0.7, top_k=1, seed=3).ids == greedy


def hf_process(processor, logits):
    return processor(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits)).numpy()


@pytest.mark.parametrize("p", [0.3, 0.8, 0.9, 0.99])
def test_top_p_keeps_the_nucleus(p):
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = np.log(probs)[None].astype(np.float32)
    kept = np.isfinite(np.asarray(S.top_p_filter(jnp.asarray(logits), p)))[0]
    # The definition: the smallest set of most likely tokens whose probability reaches p.
    order = np.argsort(-probs)
    k = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    expected = np.zeros(5, bool)
    expected[order[:k]] = True
    assert (kept == expected).all()
    assert (kept == np.isfinite(hf_process(hf_lp.TopPLogitsWarper(p), logits))[0]).all()


@pytest.mark.parametrize("min_p", [0.15, 0.35, 0.5, 0.9])
def test_min_p_keeps_tokens_above_the_scaled_top(min_p):
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = np.log(probs)[None].astype(np.float32)
    kept = np.isfinite(np.asarray(S.min_p_filter(jnp.asarray(logits), min_p)))[0]
    assert (kept == (probs >= min_p * 0.5)).all()
    assert (kept == np.isfinite(hf_process(hf_lp.MinPLogitsWarper(min_p), logits))[0]).all()


def test_top_k_and_repetition_penalty_match_hf():
    rs = np.random.RandomState(5)
    logits = rs.randn(3, 40).astype(np.float32) * 3
    np.testing.assert_array_equal(np.asarray(S.top_k_filter(jnp.asarray(logits), 7)),
                                  hf_process(hf_lp.TopKLogitsWarper(7), logits))
    history = rs.randint(0, 40, (3, 9))
    seen = np.zeros((3, 40), bool)
    seen[np.arange(3)[:, None], history] = True
    ours = S.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
    ref = hf_lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)


def test_padded_ids_are_never_sampled(gqa):
    logits = jnp.zeros((512, 64)).at[:, 50:].set(10.0)  # the padded ids 50..63 are by far the likeliest
    for params in (SamplingParams(), SamplingParams(temperature=2.0), SamplingParams(temperature=1.0, top_p=0.5)):
        tokens = np.asarray(S.sample(logits, jax.random.key(0), None, params, vocab_size=50))
        assert tokens.max() < 50 and len(set(tokens.tolist())) > (1 if params.temperature else 0)
    model, tokenizer = gqa
    head = model.lm_head[...]
    # The 20 padded output columns become +-50x copies of 10 real ones: for any hidden state one of them dominates.
    columns = head[:, 2:12] * 50
    model.lm_head[...] = head.at[:, TOKENIZER_VOCAB:].set(jnp.concatenate([columns, -columns], axis=1))
    try:
        prompts = random_prompts([5, 8, 12], seed=6)
        assert all(np.argmax(last_logits(model, p)) >= TOKENIZER_VOCAB for p in prompts)  # unmasked, they win
        for temperature in (0.0, 1.0):
            out = generate(model, tokenizer, prompts, max_new_tokens=16, temperature=temperature, seed=1)
            assert max(max(ids) for ids in out.ids) < TOKENIZER_VOCAB
    finally:
        model.lm_head[...] = head


def test_greedy_pick_is_argmax():
    rs = np.random.RandomState(7)
    logits = rs.randint(-3, 4, (64, 40)).astype(np.float32)  # small integers: many tied maxima
    logits[0] = -np.inf  # every id masked: argmax says 0
    masked = np.where(np.arange(40) < 30, logits, -np.inf)  # as process_logits masks a padded vocab of 30
    ours = np.asarray(S.first_max(jnp.asarray(masked), vocab_size=30))
    np.testing.assert_array_equal(ours, np.argmax(masked, axis=-1))
    assert ours.dtype == np.int32
    nan_row = np.full((1, 40), np.nan, np.float32)
    assert int(S.first_max(jnp.asarray(nan_row), vocab_size=30)[0]) < 30  # never a padded id, even on NaN


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_updates_the_cache_in_place(gqa, batch):
    """No copy of a whole layer's cache buffer in the compiled decode loop on CPU (README "Generation").

    The default program (without the copy-insertion option) is the oracle that the check can fail: there XLA:CPU copies
    every buffer on each step (at batch 3 too, once the new token is scored apart from the buffer it is written to).
    """
    model, tokenizer = gqa
    gen = Generator(model, tokenizer)
    captured = {}
    real = generator._decode

    def spy(params, state, limit, static):
        captured["args"] = (params, state, limit, static)
        return real(params, state, limit, static)

    generator._decode = spy
    try:
        gen.generate(random_prompts([5] * batch, seed=8), max_new_tokens=3)
    finally:
        generator._decode = real
    params, state, limit, static = captured["args"]
    buffer = state.cache.k[0]
    dims = ",".join(map(str, buffer.shape))
    copies = {}
    for name, program in generator._decode_programs.items():
        text = program.lower(params, state, limit, static=static).compile().as_text()
        copies[name] = text.count(f"f32[{dims}]{{3,2,1,0}} copy(")
    assert copies["cpu"] == 0, copies
    assert copies["default"] >= 2 * len(state.cache.k), copies


def test_bad_sampling_values_are_one_sentence():
    for kwargs, name in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                         (dict(min_p=1.5), "min_p"), (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0), "rep")):
        with pytest.raises(ConfigError, match=name):
            SamplingParams(**kwargs)


# -------------------------------------------------------------------------------------------------- stopping


def test_stop_strings_cut_exactly(gqa, monkeypatch):
    model, tokenizer = gqa
    monkeypatch.setattr(generator, "STOP_CHECK_STEPS", 4)
    prompt = "def greet(name):\n"
    full = generate(model, tokenizer, [prompt], max_new_tokens=16)[0]
    text = full.text
    assert len(text) > 12
    # A stop string that starts after the first chunk of decode steps, and one that never occurs.
    stop = text[len(text) * 2 // 3 : len(text) * 2 // 3 + 3]
    at = text.find(stop)
    cut = generate(model, tokenizer, [prompt], max_new_tokens=16, stop=[stop, "\x00absent"])[0]
    assert cut.text == text[:at] and cut.finish_reason == "stop"
    assert full.ids[: len(cut.ids)] == cut.ids
    assert stop in tokenizer.decode(cut.ids) and stop not in tokenizer.decode(cut.ids[:-1])
    # Streaming (the chat CLI's path) yields exactly the same text, piece by piece.
    pieces = list(stream_reply(Generator(model, tokenizer), [{"role": "user", "content": "hi"}], max_new_tokens=10,
                               sampling=SamplingParams(), stop=[stop]))
    reply = generate(model, tokenizer, [chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])],
                     max_new_tokens=10, stop=[stop])[0]
    assert "".join(pieces) == reply.text and len(pieces) > 1


def test_eos_ends_one_row_while_the_other_continues(gqa):
    model, tokenizer = gqa
    prompts = random_prompts([7, 15], seed=8)
    before = [full_forward_greedy(model, p, 12) for p in prompts]
    # Make eos follow the token row 0 picks at step 4 (and only that): copy its output column, scaled up a little.
    token = before[0][4]
    head = model.lm_head[...]
    model.lm_head[...] = head.at[:, 1].set(1.02 * head[:, token])
    try:
        oracle = [full_forward_greedy(model, p, 12) for p in prompts]
        assert oracle[0][-1] == 1 and len(oracle[0]) < 12 and 1 not in oracle[1]  # the setup did what it should
        out = generate(model, tokenizer, prompts, max_new_tokens=12)
        assert out[0].finish_reason == "eos" and with_eos(out[0]) == oracle[0]
        assert out[1].finish_reason == "length" and out[1].ids == oracle[1]
    finally:
        model.lm_head[...] = head


def test_prompt_and_budget_limits(gqa):
    model, tokenizer = gqa
    gen = Generator(model, tokenizer)
    with pytest.raises(ConfigError, match=r"max_new_tokens=64 is beyond the model's context of 64"):
        gen.generate(["x"], max_new_tokens=64)
    long = random_prompts([CONTEXT - 3], seed=9)[0]
    with pytest.raises(ConfigError, match=r"prompt 1 is 61 tokens, more than the 60 .* context of 64"):
        gen.generate([[0, 5], long], max_new_tokens=4)
    out = gen.generate([long], max_new_tokens=4, truncate="left")[0]
    assert out.prompt_ids == [0] + long[-59:]
    assert out.ids == gen.generate([[0] + long[-59:]], max_new_tokens=4)[0].ids


# ---------------------------------------------------------------------------------------------------- sharding


def test_mesh_2x2x2_gives_the_single_device_tokens(hf_dirs):
    path = hf_dirs["gqa"]
    tokenizer = load_tokenizer(path / "tokenizer.json")
    prompts = random_prompts([5, 16, 9], seed=10)
    single = generate(load_model(path), tokenizer, prompts, max_new_tokens=8).ids
    mesh = sharding.make_mesh((2, 2, 2))
    model = shard_model(load_model(path), mesh)
    assert len(model.layers.attn.q_proj[...].sharding.device_set) == 8
    with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
        assert generate(model, tokenizer, prompts, max_new_tokens=8).ids == single


# ------------------------------------------------------------------------------------------------ chat template

TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_chat_template_matches_the_released_jinja(hf_dirs):
    import jinja2

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nHow are you?"},
                {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "def f(x):"}]
    for add in (True, False):
        ref = jinja2.Template(TEMPLATE).render(messages=messages, bos_token=BOS, eos_token=EOS,
                                               add_generation_prompt=add)
        assert render_chat(messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=add) == ref
        # The ids are what Hugging Face gets tokenizing that text with special tokens recognized.
        raw = tokenizers.Tokenizer.from_file(str(hf_dirs["gqa"] / "tokenizer.json"))
        tokenizer = load_tokenizer(hf_dirs["gqa"] / "tokenizer.json")
        assert chat_prompt_ids(tokenizer, messages, add) == raw.encode(ref, add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------------- structure


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_import_rules():
    for path in list((REPO / "dsjax" / "generate").glob("*.py")) + [REPO / "dsjax" / "chat.py"]:
        assert not [n for n in imports_of(path) if n.startswith("dsjax.train")], path
    for path in (REPO / "dsjax" / "model").glob("*.py"):
        assert not [n for n in imports_of(path) if n.startswith(("dsjax.generate", "dsjax.train"))], path
