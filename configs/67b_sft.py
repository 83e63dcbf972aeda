"""67b_sft: supervised fine-tuning of DeepSeek LLM 67B base: 7b_sft's recipe on the 67B model, with the paper's
67B numbers.

The paper (arXiv 2401.02954, section 5): 2 epochs at lr 5e-6 for the 67B (it overfits sooner than the 7B's 4 epochs
at 1e-5). Batch, sequence length, warmup and schedule are not stated: they are 7b_sft's, our choice. Usage as in
7b_sft, with --config=67b_sft and BASE a deepseek-llm-67b-base directory or a dsjax checkpoint.
"""

from dsjax.config import load_config, with_model


def get_config():
    config = with_model(load_config("7b_sft"), "67b")
    config.name = "67b_sft"
    config.optim.update(lr=5e-6)  # the paper's
    config.train.update(epochs=2)  # the paper's
    return config
