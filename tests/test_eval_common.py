"""Shared helpers for the evaluation tests (no tests here): a tiny random Hugging Face Llama with a byte-level BPE
tokenizer.json beside it, and `transformers` log-probs as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.data.tokenizer import BOS, EOS

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Water boils at one hundred degrees.",
    "Question: What color is the sky? Answer: blue. Question: How many legs has a cat? Answer: four.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "A quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs away into the forest.",
    "Numbers: 12 and 345 and 6789; dates like 2024-01-02 and times like 10:30 appear in text.",
]


def train_tokenizer() -> Tokenizer:
    """A ~300-token byte-level BPE (GPT-2 style, as DeepSeek's) with DeepSeek's bos/eos names."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def make_hf_dir(directory: Path, seed: int = 0, max_len: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """Writes a random LlamaForCausalLM (safetensors) and its tokenizer into `directory`; returns the torch model."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
        "model_max_length": max_len,
    }))
    torch.manual_seed(seed)
    # The model's vocab is the tokenizer's: dsjax.generate never samples ids the tokenizer lacks, transformers would.
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=max_len, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def token_logprobs(model: LlamaForCausalLM, ids) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1.. (float64), from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def continuation_logprob(model, ids, n: int) -> tuple[float, bool]:
    """Summed log-prob of the last n of ids and whether greedy decoding emits them, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1]
    targets = torch.tensor(ids[1:])
    picked = logp[torch.arange(len(ids) - 1), targets][-n:]
    greedy = bool((logp.argmax(-1) == targets)[-n:].all())
    return float(picked.sum()), greedy
