"""DPO losses and metrics on fixed log-probs, against NumPy computations of TRL's formulas (dsjax/train/tasks/dpo.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.train.tasks.dpo import dpo_sums, preference_losses, summarize_dpo

BETA, EPS = 0.3, 0.2


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_losses(loss, c, r, n_c, n_r, beta, eps):
    d = c - r
    if loss == "sigmoid":
        return -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
    if loss == "robust":
        return (-(1 - eps) * np_logsig(beta * d) + eps * np_logsig(-beta * d)) / (1 - 2 * eps)
    if loss == "ipo":
        return (c / np.maximum(n_c, 1) - r / np.maximum(n_r, 1) - 1 / (2 * beta)) ** 2
    return np.maximum(0.0, 1 - beta * d)


def fixed_batch():
    """Two row pairs of 6 columns: row pair 0 holds pairs (segments) 1 and 2, row pair 1 holds pair 1 and padding.

    Returns policy sums as response_logps gives them, the reference's, and the per-pair numbers they encode."""
    rs = np.random.RandomState(0)
    rows, seq = 4, 6
    logps = np.zeros((rows, seq), np.float32)
    tokens = np.zeros((rows, seq), np.float32)
    logit_sums = np.zeros((rows, seq), np.float32)
    ref = np.zeros((rows, seq), np.float32)
    present = [(0, 0), (0, 1), (1, 0)]  # (row pair, column = segment - 1)
    for k, s in present:
        for side in range(2):
            n = rs.randint(1, 6)
            logps[2 * k + side, s] = -rs.uniform(1, 20)
            ref[2 * k + side, s] = -rs.uniform(1, 20)
            tokens[2 * k + side, s] = n
            logit_sums[2 * k + side, s] = rs.randn() * n
    take = lambda x, side: np.array([x[2 * k + side, s] for k, s in present], np.float64)  # noqa: E731
    per_pair = {name: (take(x, 0), take(x, 1)) for name, x in
                (("logps", logps), ("ref", ref), ("tokens", tokens), ("logit_sums", logit_sums))}
    policy = {"logps": jnp.asarray(logps), "tokens": jnp.asarray(tokens), "logit_sums": jnp.asarray(logit_sums)}
    return policy, jnp.asarray(ref), per_pair


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "hinge"])
@pytest.mark.parametrize("eps", [0.0, EPS])
def test_losses_and_metrics_match_numpy(loss, eps):
    policy, ref, p = fixed_batch()
    c = p["logps"][0] - p["ref"][0]
    r = p["logps"][1] - p["ref"][1]
    n_c, n_r = p["tokens"]
    loss_sum, pairs, aux = dpo_sums(policy, ref, loss=loss, beta=BETA, eps=eps)
    assert float(pairs) == 3  # the padding segments are no pairs
    expected = np_losses(loss, c, r, n_c, n_r, BETA, eps)
    np.testing.assert_allclose(float(loss_sum), expected.sum(), rtol=1e-5)
    means = summarize_dpo({"loss": float(loss_sum) / 3, **{k: float(v) / 3 for k, v in aux.items()}}, "eval_")
    want = {"eval_loss": expected.mean(), "eval_rewards/chosen": (BETA * c).mean(),
            "eval_rewards/rejected": (BETA * r).mean(), "eval_rewards/accuracies": (BETA * c > BETA * r).mean(),
            "eval_rewards/margins": (BETA * (c - r)).mean(), "eval_logps/chosen": p["logps"][0].mean(),
            "eval_logps/rejected": p["logps"][1].mean(),
            "eval_logits/chosen": p["logit_sums"][0].sum() / n_c.sum(),
            "eval_logits/rejected": p["logit_sums"][1].sum() / n_r.sum()}
    assert sorted(means) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(means[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_sft_weight_adds_the_chosen_token_mean_nll():
    policy, ref, p = fixed_batch()
    base, _, _ = dpo_sums(policy, ref, loss="sigmoid", beta=BETA)
    with_sft, _, _ = dpo_sums(policy, ref, loss="sigmoid", beta=BETA, sft_weight=0.5)
    nll = -p["logps"][0] / p["tokens"][0]
    np.testing.assert_allclose(float(with_sft) - float(base), 0.5 * nll.sum(), rtol=1e-5)


def test_values_at_initialization():
    """Policy == reference: d = 0, so sigmoid = log 2, hinge = 1, ipo = 1 / (4 beta^2), rewards 0, accuracy 0."""
    policy, _, _ = fixed_batch()
    for loss, value in (("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0),
                        ("ipo", 1 / (4 * BETA**2))):
        loss_sum, pairs, aux = dpo_sums(policy, policy["logps"], loss=loss, beta=BETA, eps=0.1)
        assert float(loss_sum) / float(pairs) == pytest.approx(value, rel=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert float(aux[key]) == 0.0, (loss, key)


def test_sigmoid_gradient_is_minus_beta_sigmoid_of_minus_beta_d():
    d = jnp.linspace(-30.0, 30.0, 13)
    grad = jax.vmap(jax.grad(lambda x: preference_losses("sigmoid", x, 0.0, 1.0, 1.0, BETA)))(d)
    np.testing.assert_allclose(np.asarray(grad), -BETA / (1 + np.exp(BETA * np.asarray(d))), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["7b_dpo", "67b_dpo"])
def test_paper_configs(name):
    from dsjax.config import load_config, validate_train

    config = load_config(name)
    validate_train(config)
    assert (config.task, config.optim.lr, config.optim.schedule, config.train.epochs) == ("dpo", 5e-6, "cosine", 1)
    assert config.train.global_batch_size == 2 * 512 and not config.dpo.packing  # 512 pairs, one per row pair
    assert config.optim.warmup_steps > 0 and config.dpo.beta == 0.1
