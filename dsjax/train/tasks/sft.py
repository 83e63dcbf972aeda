"""Supervised fine-tuning: the loss on the assistant tokens of conversations in the DeepSeek chat format.

The data is prepared with `python -m dsjax.data.prepare --format=chat` (TRL conversational or prompt-completion
rows; dsjax/data/chat.py says which tokens carry loss: every assistant token and the eos closing its turn), or is
`data.datasets=synthetic`, the offline demo set of dsjax/data/synthetic.py, prepared on first use with the
tokenizer of `train.init_from`. Conversations are packed several to a row (`sft.packing`), attention kept inside
each. The loss is the token-weighted mean over all assistant tokens of the global batch, across accumulation and
devices (TRL's default), so a long answer weighs more than a short one.

At the step-0 evaluation (before) and at the end (after), greedy answers to held-out prompts give the exact-match
accuracy (when the held-out conversations end in a reference answer) and the paper's repetition ratio
(dsjax/eval/repetition.py); both are logged as `exact_match` and `repetition_ratio`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dsjax import checkpoint
from dsjax.data import chat, pipeline, prepare, records, synthetic
from dsjax.data.corpus import cache_root
from dsjax.data.tokenizer import load_tokenizer
from dsjax.errors import ConfigError
from dsjax.train.loss import next_token_loss
from dsjax.train.tasks import answers
from dsjax.train.tasks.base import Task

SYNTHETIC = "synthetic"
SYNTHETIC_TRAIN, SYNTHETIC_VAL = 20000, 800  # tiny_sft's and tiny_dpo's exact match read all 800


def synthetic_dataset(config, tokenizer_file: Path, seq_len: int, log=print) -> Path:
    """The demo conversations, prepared once per (generator, counts, tokenizer, seed, length) into the data cache."""
    tok = load_tokenizer(tokenizer_file)
    seed = config.data.seed if config.data.seed is not None else config.seed
    name = f"{synthetic.fingerprint()}-n{SYNTHETIC_TRAIN}-{SYNTHETIC_VAL}-{tok.fingerprint[:12]}-s{seed}-L{seq_len}"
    out = cache_root(config) / f"sft-synthetic-{name}"
    if (out / prepare.MANIFEST).exists():
        return out
    raw = out.with_name(out.name + "-jsonl")
    train, val = synthetic.write_jsonl(raw, train_count=SYNTHETIC_TRAIN, val_count=SYNTHETIC_VAL, seed=seed)
    log(f"preparing the synthetic SFT conversations ({', '.join(synthetic.TASKS)}) into {out}")
    prepare.prepare([str(train)], tokenizer_file, out, format="chat", val_inputs=[str(val)], max_len=seq_len,
                    workers=1, progress=False, log=io.StringIO())
    return out


def held_out_pairs(source: pipeline.Source, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids ending in the generation prompt, reference answer ids with eos) of the val split's first
    `count` conversations: each split before its last assistant turn, read from the prepared records."""
    manifest = source.manifest
    dtype = np.dtype(manifest["token_dtype"])
    pairs = []
    for shard in manifest["splits"]["val"]["shards"]:
        reader = records.ArrayRecordReader(str(source.dir / shard))
        try:
            for record in reader.read_all():
                ids, weights = records.decode_weighted_record(record, dtype)
                trained = np.flatnonzero(weights)
                if not len(trained):
                    continue
                gaps = np.flatnonzero(np.diff(trained) > 1)
                start = trained[gaps[-1] + 1] if len(gaps) else trained[0]
                pairs.append((ids[:start].tolist(), ids[start: trained[-1] + 1].tolist()))
                if len(pairs) >= count:
                    return pairs
        finally:
            reader.close()
    return pairs


class SFTTask(Task):
    name = "sft"

    def __init__(self, config):
        super().__init__(config)
        init_from = config.train.init_from
        if not init_from:
            raise ConfigError("train.init_from is not set: SFT fine-tunes a trained model; set it to a dsjax "
                              "checkpoint or training workdir, or a Hugging Face model directory.")
        if not Path(init_from).expanduser().exists():
            hint = (" (run the quickstart first: python -m dsjax.main)" if Path(init_from) == Path("runs/tiny")
                    else "")
            raise ConfigError(f"train.init_from={init_from} does not exist{hint}; set train.init_from to a "
                              "checkpoint, a training workdir or a Hugging Face model directory.")
        self.data_config = config
        self.before: dict = {}

    # ------------------------------------------------------------------------------------------------ data

    def _resolve_data(self, log=print):
        """data.datasets with `synthetic` prepared; checks the datasets are conversations and match the model's
        tokenizer."""
        if self.data_config is not self.config:
            return
        config = self.config
        model_tok = checkpoint.find_tokenizer(config.train.init_from)
        names = [n.strip() for n in str(config.data.datasets).split(",") if n.strip()]
        if SYNTHETIC in names:
            tok_file = config.data.tokenizer or model_tok
            if tok_file is None:
                raise ConfigError(f"data.datasets={SYNTHETIC} needs a tokenizer: none was found with "
                                  f"train.init_from={config.train.init_from}; set data.tokenizer.")
            path = synthetic_dataset(config, Path(tok_file), config.train.seq_len, log)
            names = [str(path) if n == SYNTHETIC else n for n in names]
        data_config = config.copy_and_resolve_references()
        data_config.data.datasets = ",".join(names)
        sources = pipeline.resolve_sources(data_config)
        for source in sources:
            if source.manifest.get("data_format", "text") != "chat":
                raise ConfigError(f"data.datasets: {source.dir} holds {source.manifest.get('data_format', 'text')} "
                                  "documents; SFT needs conversations prepared with --format=chat.")
        if model_tok is not None:
            fingerprint = load_tokenizer(model_tok).fingerprint
            if sources[0].manifest["tokenizer"]["fingerprint"] != fingerprint:
                raise ConfigError(f"data.datasets: {sources[0].dir} was prepared with another tokenizer than the "
                                  f"one of train.init_from ({model_tok}); prepare it with --tokenizer={model_tok}.")
        self.data_config, self.sources = data_config, sources

    def _loader(self, split, **kw):
        self._resolve_data()
        return pipeline.make_loader(self.data_config, split, seq_len=self.config.train.seq_len,
                                    packing=bool(self.config.sft.packing), **kw)

    def setup(self, *, mesh, rules, batch_sharding, workdir, log):
        self._resolve_data(log)

    def batches_per_epoch(self, global_batch_size):
        import jax

        loader = self._loader("train", global_batch_size=global_batch_size, num_epochs=1,
                              process_index=jax.process_index(), process_count=jax.process_count())
        batches = loader.num_batches
        loader.close()
        return batches

    def train_data(self, *, global_batch_size, process_index, process_count):
        return self._loader("train", global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count)

    def val_data(self, *, global_batch_size, process_index, process_count):
        return self._loader("val", global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count, num_epochs=1)

    def tokenizer(self):
        self._resolve_data()
        return load_tokenizer(pipeline.tokenizer_path(self.sources))

    # ------------------------------------------------------------------------------------------------ loss

    def loss(self, model, batch, frozen):
        loss_sum, weight_sum = next_token_loss(model, batch)
        return loss_sum, weight_sum, {}

    # ------------------------------------------------------------------------------------ greedy answers

    def _generate_metrics(self, model, log, chats: int = 0) -> dict:
        sft = self.config.sft
        count = max(sft.repetition_prompts, sft.exact_match_examples)
        if not count:
            return {}
        tok = self.tokenizer()
        pairs = held_out_pairs(self.sources[0], count)
        references = [chat.response_text(tok, ref) for _, ref in pairs]
        return answers.answer_metrics(model, tok, [p for p, _ in pairs], references,
                                      exact_match_examples=sft.exact_match_examples,
                                      repetition_prompts=sft.repetition_prompts, max_new_tokens=sft.max_new_tokens,
                                      log=log, chats=chats)

    def on_eval(self, model, step, log) -> dict:
        final = step >= self.config.train.steps
        if final or not (step == 0 or self.config.sft.generate_at_eval):
            return {}  # the end of the run measures in `report`
        metrics = self._generate_metrics(model, log)
        if step == 0:
            self.before = metrics
        return metrics

    def report(self, model, mesh, log):
        metrics = self._generate_metrics(model, log, chats=3)
        answers.log_before_after(self.before, metrics, log)
        return metrics
