"""7b_sft: supervised fine-tuning of DeepSeek LLM 7B base, the paper's settings where it gives them.

The paper (arXiv 2401.02954, section 5): 1.5M conversations, 4 epochs at lr 1e-5 for the 7B. It does not state the
batch, the sequence length, the warmup or the schedule: those below are our choice (marked). Set the base model and
the data:

    python -m dsjax.data.prepare --format=chat --input=sft.jsonl --tokenizer=BASE/tokenizer.json \
        --output=prepared/sft --max_len=4096
    python -m dsjax.main --config=7b_sft --config.train.init_from=BASE --config.data.datasets=prepared/sft

BASE is a Hugging Face directory (deepseek-llm-7b-base) or a dsjax checkpoint; it is read directly.
"""

from dsjax.config import load_config


def get_config():
    config = load_config("7b")
    config.name = "7b_sft"
    config.task = "sft"
    config.optim.update(lr=1e-5)  # the paper's
    config.train.update(epochs=4)  # the paper's
    config.train.update(global_batch_size=128, seq_len=4096)  # our choice: 128 packed rows of 4096 (~0.5M tokens)
    config.optim.update(warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)  # our choice
    config.data.datasets = ""  # set to prepared chat datasets
    config.checkpoint.update(every_steps=500)
    config.eval.update(every_steps=500, steps=20)
    config.log.samples = ()
    return config
