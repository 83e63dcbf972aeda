"""7b_dpo: Direct Preference Optimization of the DeepSeek LLM 7B SFT model, the paper's settings where it gives them.

The paper (arXiv 2401.02954, section 5): one epoch of DPO on helpfulness and harmlessness pairs at lr 5e-6, batch
size 512, linear warmup then cosine decay. It does not state beta, the sequence length, the warmup length or the
final learning rate: those below are our choice (marked). Prepare TRL preference pairs with the model's tokenizer
and start from the SFT result (a 7b_sft workdir, a dsjax checkpoint, or a Hugging Face directory such as
deepseek-llm-7b-chat); it is also the reference model unless dpo.reference_from says otherwise:

    python -m dsjax.data.prepare --format=preference --input=pairs.jsonl --tokenizer=SFT/tokenizer.json \
        --output=prepared/dpo --max_len=4096
    python -m dsjax.main --config=7b_dpo --config.train.init_from=SFT --config.data.datasets=prepared/dpo

The reference's log-probs are computed in one pass before training and stored in the workdir (dpo_reference.py).
"""

from dsjax.config import load_config


def get_config():
    config = load_config("7b")
    config.name = "7b_dpo"
    config.task = "dpo"
    config.optim.update(lr=5e-6, schedule="cosine")  # the paper's: lr 5e-6, warmup then cosine
    config.train.update(epochs=1)  # the paper's
    # The paper's batch of 512 pairs: one pair per row pair (dpo.packing False), so 1024 rows of which 512 chosen.
    config.train.update(global_batch_size=1024)
    config.dpo.update(packing=False)
    config.dpo.update(beta=0.1, loss="sigmoid")  # our choice: beta is not stated, 0.1 is the common default
    config.train.update(seq_len=4096)  # our choice: the model's context; longer pairs are cut by prepare --max_len
    config.optim.update(warmup_steps=20, min_lr_ratio=0.0)  # our choice: ~10% of a 100K-pair epoch; decay to 0
    # AdamW and clipping stay those of pre-training (beta2 0.95, weight decay 0.1, norm 1.0): our choice, the paper
    # states none for DPO.
    config.train.update(init_from="runs/7b_sft")  # the 7b_sft run's workdir; override with any SFT model
    config.data.datasets = ""  # set to prepared preference datasets
    config.checkpoint.update(every_steps=50)
    config.eval.update(every_steps=50, steps=10)
    config.log.samples = ()
    return config
