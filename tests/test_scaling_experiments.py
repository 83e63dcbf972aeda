"""experiments/scaling: the fitter against known laws, the runner's arithmetic, and a CI-sized sweep end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dsjax import scaling
from experiments.scaling import fit, family, plots, run, runner
from experiments.scaling.family import Point, Shape


def synthetic_isoflop(k=0.2, a=0.55, noise=5e-4, seed=1):
    """bpb = E(C) + 0.01 ln(M / M_opt)^2 + noise, with M_opt = k C^a and D = C / M: a known allocation law."""
    rng = np.random.default_rng(seed)
    records = []
    for C in np.geomspace(1e17, 3e20, 6):
        M_opt = k * C**a
        for M in np.geomspace(M_opt / 5, M_opt * 5, 7) * np.exp(rng.normal(0, 0.05, 7)):
            bpb = 0.9 - 0.02 * math.log10(C) + 0.01 * math.log(M / M_opt) ** 2 + rng.normal(0, noise)
            records.append({"C": C, "M": M, "D": C / M, "bpb": bpb})
    return records


def test_fitter_recovers_a_known_allocation_law():
    result = fit.fit_allocation(synthetic_isoflop(), n_boot=200)
    M_fit, D_fit = result["M_opt"], result["D_opt"]
    lo, hi = M_fit["exponent_interval"]
    assert lo <= 0.55 <= hi and hi - lo < 0.02
    lo, hi = M_fit["k_interval"]
    assert lo <= 0.2 <= hi
    lo, hi = D_fit["exponent_interval"]
    assert lo <= 0.45 <= hi
    lo, hi = D_fit["k_interval"]
    assert lo <= 5.0 <= hi  # D_opt = C / M_opt = (1 / 0.2) C^0.45
    assert abs(result["a_plus_b"] - 1) < 0.01
    assert len(M_fit["budgets_used"]) == 6 and not M_fit["budgets_without_minimum"]


def test_far_points_off_the_parabola_do_not_move_the_minimum():
    """A jump far from the optimum (as between one- and two-layer shapes) lies outside the fitted window."""
    clean = synthetic_isoflop(noise=0)
    bent = [dict(r, bpb=r["bpb"] + (0.8 if r["M"] > 4 * 0.2 * r["C"] ** 0.55 else 0)) for r in clean]
    for C, found in fit.isoflop_minima(bent).items():
        assert found["M_opt"] == pytest.approx(0.2 * C**0.55, rel=0.03)
    whole = fit.isoflop_minima(bent, width=10)  # a parabola through every point: the jump drags the vertex left
    assert all(found["M_opt"] is None or found["M_opt"] < 0.85 * 0.2 * C**0.55 for C, found in whole.items())


def test_a_budget_without_an_interior_minimum_is_left_out():
    records = synthetic_isoflop()
    C_last = max(r["C"] for r in records)
    records = [r for r in records if r["C"] != C_last or r["M"] < 0.2 * C_last**0.55 / 1.5]  # only its left side
    result = fit.fit_allocation(records, n_boot=20)
    assert result["M_opt"]["budgets_without_minimum"] == [C_last]
    assert result["minima"][f"{C_last:.4g}"]["M_opt"] is None


def test_near_optimal_band_and_hparam_laws_from_a_synthetic_bowl():
    """A bowl in (log lr, log B) whose centre moves as lr* = 0.3 C^-0.125, B* = 0.3 C^0.33: the fit finds both."""
    records = []
    for C in (1e17, 1e18, 1e19, 1e20):
        lr_star, b_star = 0.3 * C**-0.125, 0.3 * C**0.33
        for lr in lr_star * 2.0 ** np.arange(-3, 4) / 1.0:
            for tokens in b_star * 2.0 ** np.arange(-3, 4):
                bpb = 1.0 + 0.004 * math.log(lr / lr_star) ** 2 + 0.002 * math.log(tokens / b_star) ** 2
                records.append({"C": C, "lr": lr, "batch": tokens / 4096, "seq_len": 4096, "bpb": bpb})
    band = fit.near_optimal(records)
    for C, group in band.items():
        # By hand: 0.004 u^2 + 0.002 v^2 <= 0.0025 * 1.0, u, v = (multiples of ln 2): exactly these grid offsets.
        expected = {(i, j) for i in range(-3, 4) for j in range(-3, 4)
                    if 0.004 * (i * math.log(2)) ** 2 + 0.002 * (j * math.log(2)) ** 2 <= 0.0025 + 1e-12}
        got = {(round(math.log2(r["lr"] / (0.3 * C**-0.125))), round(math.log2(r["batch"] * 4096 / (0.3 * C**0.33))))
               for r in group}
        assert got == expected
    laws = fit.fit_hparams(records)
    assert laws["lr"]["a"] == pytest.approx(-0.125, abs=1e-9) and laws["lr"]["k"] == pytest.approx(0.3, rel=1e-6)
    assert laws["batch_tokens"]["a"] == pytest.approx(0.33, abs=1e-9)


def test_one_budget_is_not_enough_for_a_law():
    with pytest.raises(ValueError, match="two or more budgets"):
        fit.fit_hparams([{"C": 1e17, "lr": 1e-3, "batch": 1, "seq_len": 4, "bpb": 1.0}])


@pytest.mark.parametrize("C", [1e9, 3.7e11, 2e12, 5e13])
@pytest.mark.parametrize("shape", [Shape(1, 48, 16), Shape(3, 96, 16), Shape(6, 192, 32)])
@pytest.mark.parametrize("batch", [4, 13])
def test_points_spend_the_budget_within_one_step(C, shape, batch):
    point = Point(C, shape, 256, 1e-3, batch, 1024)
    assert point.M == 72 * shape.n_layers * shape.d_model**2 + 12 * shape.n_layers * shape.d_model * 256
    assert point.D == point.steps * batch * 256
    if point.steps > 1:
        assert abs(point.M * point.D - C) <= point.M * point.tokens_per_step / 2 + 1e-6 * C


def test_family_shapes_span_the_requested_range():
    shapes = family.shapes_around(1e6, 256, points=5, span=10, head_dim=16)
    Ms = [s.M(256) for s in shapes]
    assert Ms == sorted(Ms) and len(set(Ms)) == len(Ms) >= 4
    assert 5 < Ms[-1] / Ms[0] < 20
    for s in shapes:
        assert s.d_model % 16 == 0 and s.n_heads * s.head_dim == s.d_model and s.d_ff % 8 == 0
    # The target's nearest shape at the chosen depth: within one width step of the exact root.
    s = family.shape_for(3e6, 256, head_dim=16)
    assert abs(s.d_model - family._width_for(3e6, s.n_layers, 256)) <= 8


def test_allocation_plot_from_synthetic_fits(tmp_path):
    records = synthetic_isoflop()
    result = fit.fit_allocation(records, n_boot=20)
    for path in (plots.isoflop(records, result, tmp_path / "iso.png"), plots.allocation(result, tmp_path / "a.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # ~70 s of 2-core CPU (eight short real runs); the default CI run is kept under its budget
def test_ci_sweep_end_to_end_then_resumed(tmp_path, monkeypatch, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert run.main(["--preset=ci", f"--out={out}", f"--runs={runs}"]) == 0
    hp = runner.read_results(out / "hparams.jsonl")
    iso = runner.read_results(out / "isoflop.jsonl")
    preset = run.PRESETS["ci"]
    assert len(hp) == len(preset.hparam_budgets) * len(preset.lrs) * len(preset.batches)
    assert len(iso) == 2 * len(preset.isoflop_budgets) and {r["kind"] for r in iso} == {"isoflop"}
    for r in hp + iso:
        assert {"C", "M", "N1", "N2", "D", "lr", "batch", "bpb", "loss", "wall_s"} <= set(r)
        assert r["D"] == r["steps"] * r["batch"] * r["seq_len"]
        assert r["M"] == scaling.M(r["n_layers"], r["d_model"], r["seq_len"])
        assert 0 < r["bpb"] < 4.6  # trained: below the untrained model's ~4.55
        metrics = [json.loads(line) for line in (runs / r["key"] / "metrics.jsonl").read_text().splitlines()]
        assert max(m["step"] for m in metrics) == r["steps"]
    # IsoFLOP lr and batch come from the fitted hyperparameter laws.
    laws = json.loads((out / "fit.json").read_text())["hparams"]
    for r in iso:
        expected_lr = float(f"{laws['lr']['k'] * r['C'] ** laws['lr']['a']:.4g}")
        assert r["lr"] == pytest.approx(expected_lr, rel=1e-9)
    for name in ("hparams.png", "isoflop.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # Again: every point is skipped (training it would fail here), and the records are unchanged.
    before = ((out / "hparams.jsonl").read_text(), (out / "isoflop.jsonl").read_text())
    monkeypatch.setattr("dsjax.train.trainer.train", lambda *a, **k: pytest.fail("a finished point was retrained"))
    assert run.main(["--preset=ci", f"--out={out}", f"--runs={runs}"]) == 0
    assert ((out / "hparams.jsonl").read_text(), (out / "isoflop.jsonl").read_text()) == before
    # A point trained but not yet recorded (a crash before the results file was written) is not trained again.
    lines = before[1].splitlines(keepends=True)
    (out / "isoflop.jsonl").write_text("".join(lines[:-1]))
    assert run.main(["--preset=ci", f"--out={out}", f"--runs={runs}", "--stage=isoflop"]) == 0
    assert sorted((out / "isoflop.jsonl").read_text().splitlines()) == sorted(before[1].splitlines())

    # A results file with a broken line: one sentence naming file:line.
    (out / "isoflop.jsonl").write_text(lines[0] + "{not json\n")
    capsys.readouterr()
    assert run.main(["--preset=ci", f"--out={out}", f"--runs={runs}", "--stage=report"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'isoflop.jsonl'}:2: not a JSON record" in err and err.count("\n") == 1
