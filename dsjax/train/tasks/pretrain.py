"""Pretraining: next-token prediction on the config's prepared datasets (data.datasets; "builtin" is the stdlib
corpus), held-out loss and bits-per-byte, greedy samples at the end."""

from __future__ import annotations

import math

from dsjax.data import pipeline
from dsjax.train.loss import next_token_loss
from dsjax.train.tasks.base import Task


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, config):
        super().__init__(config)
        self._bytes_per_token = None

    def _loader(self, split, **kw):
        return pipeline.make_loader(self.config, split, seq_len=self.config.train.seq_len, **kw)

    def train_data(self, *, global_batch_size, process_index, process_count):
        return self._loader("train", global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count)

    def val_data(self, *, global_batch_size, process_index, process_count):
        loader = self._loader("val", global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count, num_epochs=1)
        self._bytes_per_token = loader.stats["bytes"] / max(loader.stats["targets"], 1)
        return loader

    def loss(self, model, batch, frozen):
        loss_sum, weight_sum = next_token_loss(model, batch)
        return loss_sum, weight_sum, {}

    def summarize(self, means, prefix):
        out = super().summarize(means, prefix)
        if prefix == "eval_" and self._bytes_per_token:
            # bits per UTF-8 byte: mean nats per predicted token / ln 2 / bytes per predicted token of the split
            out["eval_bpb"] = means["loss"] / math.log(2) / self._bytes_per_token
        return out

    def tokenizer(self):
        return pipeline.load_config_tokenizer(self.config)

    def complete(self, model, prompts, max_new_tokens):
        """Completions with the KV-cache generator (every process takes part: the weights are global)."""
        from dsjax.generate import generate

        log = self.config.log
        return generate(model, self.tokenizer(), list(prompts), max_new_tokens=max_new_tokens,
                        temperature=log.sample_temperature, top_k=log.sample_top_k, seed=self.config.seed).texts

    def report(self, model, mesh, log):
        prompts, tokens = tuple(self.config.log.samples), self.config.log.sample_tokens
        if not prompts or not tokens:
            return {}
        for prompt, completion in zip(prompts, self.complete(model, prompts, tokens)):
            if completion.strip():
                log(f"--- sample: {prompt!r}\n{prompt}{completion}")
            else:  # an undertrained model: say so instead of printing a screen of blank lines
                log(f"--- sample: {prompt!r} -> {completion!r}: only whitespace, or the text ended at once; after "
                    f"{self.config.train.steps} steps the model has not learned more than that yet (the quickstart's "
                    "350 steps give code)")
        return {}
