"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs, as the paper's last alignment stage.

Data: a dataset from `python -m dsjax.data.prepare --format=preference`. In its batches rows 2k and 2k+1 are the
chosen and the rejected row of the same pairs and segment s of both rows is one pair (see dsjax/data/pipeline.py).
So per-response values are arrays (rows, seq_len) shaped like the batch: [row, s - 1] belongs to segment s of that
row (columns past the row's last segment are 0), even rows the chosen responses, odd rows the rejected ones; `pairs`
splits them. A response's log-probability is the sum of log p(target) * loss_weights over its segment: reply tokens
and eos, nothing of the prompt. Keeping the batch's leading axis lets the trainer shard and split these like every
other key of the batch (a pair never straddles devices: setup checks each holds an even number of rows).

Losses, TRL's current definitions (trl.DPOTrainer.dpo_loss). With the policy's and the reference's summed
log-probs, c = logp_chosen - ref_chosen, r = logp_rejected - ref_rejected, d = c - r, beta = dpo.beta (entering
once, never squared), eps = dpo.label_smoothing, n_c and n_r the responses' token counts (at least 1):

    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)          (the paper's DPO at eps = 0;
                                                                                 cDPO with eps > 0, as TRL)
    robust   (-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps)    (rDPO)
    ipo      (c / n_c - r / n_r - 1 / (2 beta))^2                               (IPO eq. 17, length-normalized)
    hinge    relu(1 - beta d)                                                   (SLiC)

plus, with dpo.sft_weight = w > 0, w times the chosen response's token-mean negative log-likelihood (RPO; TRL's
rpo_alpha takes its token mean over a micro-batch, which would change with how the batch is split: ours is the
mean over each chosen response, the same however it is split). The loss is summed per pair and divided by the
number of pairs of the global batch (weight_sum = pairs), so accumulation and sharding give the full-batch number.

Metrics (TRL's names; train and, with the eval_ prefix, held-out): rewards/chosen = mean beta c, rewards/rejected =
mean beta r, rewards/accuracies = mean [beta c > beta r] (strict: 0 at initialization), rewards/margins = mean
beta (c - r), logps/chosen and logps/rejected = mean policy log-probs, logits/chosen and logits/rejected = the mean
logit over the vocabulary and every response token of the batch (a token mean, as TRL's). Rewards use the
unnormalized c and r for every loss (TRL reports IPO's length-normalized ones).

Reference: dpo.reference_from, default train.init_from (the SFT model). `dpo.reference=precomputed` (default) runs
it once over the data before training (dpo_reference.py) and batches carry its log-probs as `ref_logps`, so the
step holds one model; `dpo.reference=model` keeps it as the state's `frozen` subtree (no gradients, no optimizer
state, sharded like the policy, restored from its own checkpoint on resume, never saved again). Either way the
held-out rewards are measured against the reference, never against the policy being trained.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import checkpoint as params_ckpt
from dsjax import sharding as shd
from dsjax.data import pipeline
from dsjax.errors import ConfigError, DataError
from dsjax.train.loss import target_logps
from dsjax.train.state import abstract_params, param_axes
from dsjax.train.tasks import answers
from dsjax.train.tasks.base import Frozen, Task

# The logged metrics, TRL's names (eval_ prefixed for the held-out pairs).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")
# Aux sums that summarize() turns into the token means logits/chosen and logits/rejected, then drops.
_LOGIT_SUMS = {"logits/chosen": ("_logit_sum/chosen", "_tokens/chosen"),
               "logits/rejected": ("_logit_sum/rejected", "_tokens/rejected")}


# ------------------------------------------------------------------------------------------------ the arithmetic

def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """(rows, seq) per-token values -> (rows, seq) sums per segment: column s - 1 holds segment s (0 is padding)."""
    seq = values.shape[1]
    sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=seq + 1))(values, segment_ids)
    return sums[:, 1:]


def response_logps(model, batch: dict) -> dict:
    """Per (row, segment): `logps` = sum of log p(target) * loss_weights, `tokens` = sum of loss_weights,
    `logit_sums` = sum over the response tokens of the mean logit over the vocabulary. Arrays (rows, seq)."""
    token_logps, mean_logits = target_logps(model, batch)  # chunked like the loss: no full logits
    weights = batch["loss_weights"].astype(jnp.float32)
    seg = batch["segment_ids"]
    return {"logps": segment_sums(token_logps * weights, seg), "tokens": segment_sums(weights, seg),
            "logit_sums": segment_sums(mean_logits * weights, seg)}


def pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows, ...) -> (chosen, rejected), each (rows // 2, ...): even rows chosen, odd rows rejected."""
    view = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return view[:, 0], view[:, 1]


def preference_losses(loss: str, c: jax.Array, r: jax.Array, n_c: jax.Array, n_r: jax.Array, beta: float,
                      eps: float = 0.0) -> jax.Array:
    """Per-pair losses of the module docstring from the log-ratios c, r and the response token counts n_c, n_r."""
    d = c - r
    if loss == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    if loss == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(beta * d) + eps * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss == "ipo":
        return (c / jnp.maximum(n_c, 1.0) - r / jnp.maximum(n_r, 1.0) - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return jax.nn.relu(1 - beta * d)
    raise ConfigError(f"dpo.loss={loss!r} is not one of sigmoid, robust, ipo, hinge.")


def dpo_sums(policy: dict, ref_logps: jax.Array, *, loss: str, beta: float, eps: float = 0.0,
             sft_weight: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """(loss_sum, pairs, aux sums) from `response_logps` of the policy and the reference's per-(row, segment)
    log-probs. A pair is a segment with a response token on either side; padding segments count for nothing."""
    (pc, pr), (qc, qr), (n_c, n_r), (lc, lr) = (pairs(policy["logps"]), pairs(ref_logps), pairs(policy["tokens"]),
                                                pairs(policy["logit_sums"]))
    valid = ((n_c + n_r) > 0).astype(jnp.float32)
    c, r = pc - qc, pr - qr
    per_pair = preference_losses(loss, c, r, n_c, n_r, beta, eps)
    if sft_weight:
        per_pair = per_pair + sft_weight * (-pc / jnp.maximum(n_c, 1.0))
    total = lambda x: jnp.sum(x * valid)  # noqa: E731
    aux = {"rewards/chosen": total(beta * c), "rewards/rejected": total(beta * r),
           "rewards/accuracies": total((beta * c > beta * r).astype(jnp.float32)),
           "rewards/margins": total(beta * (c - r)), "logps/chosen": total(pc), "logps/rejected": total(pr),
           "_logit_sum/chosen": total(lc), "_tokens/chosen": total(n_c),
           "_logit_sum/rejected": total(lr), "_tokens/rejected": total(n_r)}
    return total(per_pair), jnp.sum(valid), aux


def summarize_dpo(means: dict, prefix: str) -> dict:
    """Weight-normalized sums -> logged metrics; the logits metrics are token means (ratios of two pair means)."""
    out = {prefix + k: v for k, v in means.items() if not k.startswith("_")}
    for name, (num, den) in _LOGIT_SUMS.items():
        if num in means:
            out[prefix + name] = means[num] / means[den] if means[den] else 0.0
    return out


# ---------------------------------------------------------------------------------------------------- the task

def reference_path(config) -> str:
    path = config.dpo.reference_from or config.train.init_from
    if not path:
        raise ConfigError("dpo needs a reference model: set train.init_from (the SFT model) or dpo.reference_from.")
    return path


def load_reference(config, model_cfg, shardings) -> dict:
    """The reference model's parameters placed on `shardings`, checked against the policy's shapes."""
    path = reference_path(config)
    keep = {k: getattr(model_cfg, k) for k in params_ckpt.RUNTIME_FIELDS}
    model = params_ckpt.load_model(path, shardings=shardings, **keep)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        if getattr(model.config, key) != getattr(model_cfg, key):
            raise ConfigError(f"the DPO reference {path!r} has {key}={getattr(model.config, key)} but "
                              f"model.{key}={getattr(model_cfg, key)}.")
    return params_ckpt.params_dict(model)


SYNTHETIC = "synthetic"  # data.datasets name of the demo's on-policy pairs (dpo_synthetic.py)


class DPOTask(Task):
    name = "dpo"

    def __init__(self, config):
        super().__init__(config)
        reference_path(config)
        init_from = config.train.init_from
        if init_from and not Path(init_from).expanduser().exists():
            hint = (" (run the SFT stage first: python -m dsjax.main --config=tiny_sft)"
                    if Path(init_from) == Path("runs/tiny_sft") else "")
            raise ConfigError(f"train.init_from={init_from} does not exist{hint}; set train.init_from to the SFT "
                              "model: a checkpoint, a training workdir or a Hugging Face model directory.")
        names = [n.strip() for n in str(config.data.datasets).split(",") if n.strip()]
        if config.dpo.exact_match_examples and names != [SYNTHETIC]:
            raise ConfigError("dpo.exact_match_examples needs data.datasets=synthetic (held-out problems with known "
                              "answers); set it to 0 for other data.")
        if SYNTHETIC in names and not init_from:
            raise ConfigError("data.datasets=synthetic samples the SFT model's answers: set train.init_from.")
        self.reference = None  # dpo_reference.ReferenceLogps once setup() ran (precomputed mode)
        self.resolved = SYNTHETIC not in names
        self.before: dict = {}

    def _resolve_data(self, log=print) -> None:
        """Builds the synthetic pairs (once, cached) and points this task's config at them."""
        if self.resolved:
            return
        from dsjax.train.tasks.dpo_synthetic import synthetic_pairs

        path = synthetic_pairs(self.config, log)
        names = [n.strip() for n in str(self.config.data.datasets).split(",") if n.strip()]
        config = self.config.copy_and_resolve_references()
        config.data.datasets = ",".join(str(path) if n == SYNTHETIC else n for n in names)
        self.config, self.resolved = config, True

    @property
    def precomputed(self) -> bool:
        return self.config.dpo.reference == "precomputed"

    def _loader(self, split, **kw):
        self._resolve_data()
        loader = pipeline.make_loader(self.config, split, seq_len=self.config.train.seq_len,
                                      packing=bool(self.config.dpo.packing), **kw)
        if loader.data_format != "preference":
            loader.close()
            raise DataError(f"data.datasets={self.config.data.datasets} is a {loader.data_format} dataset; DPO "
                            "needs one prepared with --format=preference.")
        return loader

    def batches_per_epoch(self, global_batch_size):
        loader = self._loader("train", global_batch_size=global_batch_size, num_epochs=1)
        try:
            return loader.num_batches
        finally:
            loader.close()

    def setup(self, *, mesh, rules, batch_sharding, workdir, log):
        self._resolve_data(log)
        cfg = self.config
        unit = 2 * shd.data_parallel_size(mesh, rules)
        checks = [("train.global_batch_size", cfg.train.global_batch_size // cfg.train.grad_accum_steps)]
        if cfg.eval.every_steps:
            checks.append(("eval.batch_size", cfg.eval.batch_size))
        for key, rows in checks:
            if rows % unit:
                raise ConfigError(f"{key} gives {rows} rows per micro-batch, which must be a multiple of 2 x the "
                                  f"data-parallel size {unit // 2}: a pair's chosen and rejected rows share a device.")
        if self.precomputed:
            from dsjax.train.tasks.dpo_reference import ReferenceLogps

            self.reference = ReferenceLogps.prepare(self, mesh=mesh, rules=rules, batch_sharding=batch_sharding,
                                                    workdir=workdir, log=log)

    def train_data(self, *, global_batch_size, process_index, process_count):
        loader = self._loader("train", global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count)
        return self.reference.attach(loader, "train") if self.precomputed else loader

    def val_data(self, *, global_batch_size, process_index, process_count):
        loader = self._loader("val", global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count, num_epochs=1)
        return self.reference.attach(loader, "val") if self.precomputed else loader

    def frozen(self, model_cfg):
        if self.precomputed:
            return None
        return Frozen(abstract=abstract_params(model_cfg), axes=param_axes(model_cfg),
                      load=lambda shardings: load_reference(self.config, model_cfg, shardings), save=False)

    def loss(self, model, batch, frozen):
        policy = response_logps(model, batch)
        if self.precomputed:
            ref_logps = batch["ref_logps"]
        else:
            reference = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(frozen))
            ref_logps = response_logps(reference, batch)["logps"]
        d = self.config.dpo
        return dpo_sums(policy, ref_logps, loss=d.loss, beta=float(d.beta), eps=float(d.label_smoothing),
                        sft_weight=float(d.sft_weight))

    def summarize(self, means, prefix):
        return summarize_dpo(means, prefix)

    def tokenizer(self):
        self._resolve_data()
        return pipeline.load_config_tokenizer(self.config)

    # ------------------------------------------------------------------------------------ greedy answers

    def _answer_metrics(self, model, log, chats: int = 0) -> dict:
        n = self.config.dpo.exact_match_examples
        if not n:
            return {}
        from dsjax.train.tasks.dpo_synthetic import exact_match_prompts

        tok = self.tokenizer()
        prompts, references = exact_match_prompts(self.config, tok)
        return answers.answer_metrics(model, tok, prompts, references, exact_match_examples=n, repetition_prompts=n,
                                      max_new_tokens=self.config.dpo.max_new_tokens, log=log, chats=chats)

    def on_eval(self, model, step, log) -> dict:
        if step != 0:
            return {}  # before training here; after, in `report`
        self.before = self._answer_metrics(model, log)
        return self.before

    def report(self, model, mesh, log):
        metrics = self._answer_metrics(model, log, chats=3)
        answers.log_before_after(self.before, metrics, log)
        return metrics
