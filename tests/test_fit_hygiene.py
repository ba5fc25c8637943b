"""Fits that say when they cannot be trusted (issue 17, parts 2-4): IsoFLOP budget hygiene,
the windowed parabola, float64 counts, no leaked warnings, shipped published tables."""

import json

import numpy as np
import pandas as pd
import pytest

from scaling import fit, published
from scaling.cli import main

KEYS = ["dataset", "hparams", "warmup", "decay", "param_count", "val"]


def _porian():
    pts, fits = published.load("porian2024_isoflop"), published.load("porian2024_fits")
    for f in fits:
        sub = pts
        for k in KEYS:
            sub = sub[sub[k] == f[k]]
        yield f["config_label"], sub, f["bs_median_weighted"]["n_exponent"]


@pytest.mark.slow
def test_porian_15_configurations_akima_and_windowed_parabola():
    d = {"akima": [], "window": [], "all": []}
    for label, sub, pub in _porian():
        kw = dict(columns="C=flops,N=n_params,D=t_tokens", budget_col="C")
        d["akima"].append(fit.isoflop(sub, method="akima", **kw).a - pub)
        d["window"].append(fit.isoflop(sub, method="parabola", **kw).a - pub)
        d["all"].append(fit.isoflop(sub, method="parabola", window_dex=None, **kw).a - pub)
    err = {k: np.abs(v) for k, v in d.items()}
    assert len(err["akima"]) == 15 and err["akima"].max() < 0.01  # measured max 0.0069, mean 0.0027
    # measured: windowed mean 0.0141, max 0.0308; every size mean 0.0254, max 0.0731 (the issue's
    # 0.01 for the parabola is not met: docs/analysis.md says why)
    assert err["window"].mean() < err["all"].mean() and err["window"].max() < err["all"].max()


def test_continuous_flops_are_refused_not_fitted_as_one_budget(capsys, tmp_path):
    d = published.load("chinchilla_epoch")
    p = tmp_path / "chinchilla.csv"
    d.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "isoflop", "--columns", "N=N_params,D=D_tokens,C=C_flop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not discrete budgets" in err[0] and "--budget-column" in err[0], err


def test_budget_column_may_be_named_by_its_source_name():
    sub = next(s for label, s, _ in _porian() if label == "Optimizer tuning (no decay)")
    a1 = fit.isoflop(sub, method="akima", columns="C=flops,N=n_params,D=t_tokens", budget_col="flops").a
    a2 = fit.isoflop(sub, method="akima", columns="C=flops,N=n_params,D=t_tokens", budget_col="C").a
    assert a1 == a2
    table = fit.compare(runs=sub, columns="C=flops,N=n_params,D=t_tokens", budget_col="flops")
    assert list(table["method"][:2]) == ["parabola", "akima"]


def test_int64_counts_give_the_float64_result(tmp_path, capsys):
    rng = np.random.default_rng(0)
    N = rng.choice([1e9, 2e9, 4e9, 1e10], 40)
    D = rng.choice([2e10, 6e10, 2e11], 40)
    loss = 1.7 + 400 / N ** 0.34 + 410 / D ** 0.28
    df = pd.DataFrame({"N": N.astype(np.int64), "D": D.astype(np.int64), "C": 6 * N * D, "loss": loss})
    wrapped = (df["N"] * df["D"]).to_numpy().astype(float) != N * D
    assert df["N"].dtype == np.int64 and wrapped.all()  # N * D overflows int64 (wraps) in every row
    p = tmp_path / "w.csv"
    df.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--json", "--predict", "C=1e22"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["flops_per_param_token"] == pytest.approx(6.0, rel=1e-9)
    assert res["predictions"][0]["N_opt"] is not None and "RuntimeWarning" not in out.err


def test_holdout_largest_zero_is_an_error(tmp_path, capsys):
    df = published.load("chinchilla_epoch")
    p = tmp_path / "c.csv"
    df.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--columns", "N=N_params,D=D_tokens,C=C_flop",
                 "--holdout-largest", "0"]) == 2
    assert "--holdout-largest: must be >= 1" in capsys.readouterr().err


def _weak_table(n=30, seed=0):
    """A (Mis)Fitting-like weak design: sizes and tokens over a factor of 3 each, E = 0 in truth."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(3e7), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(3e9), n))
    return pd.DataFrame({"N": N, "D": D, "loss": (400 / N ** 0.34 + 410 / D ** 0.28) * np.exp(rng.normal(0, 0.01, n))})


def test_a_weak_parametric_fit_is_flagged_and_a_strong_one_is_not(capsys, tmp_path):
    r = fit.chinchilla(_weak_table(), bootstrap=60, seed=1)
    assert not r.identified["E"] and r.boot_at_bound["E"] > 0
    assert any(w.startswith("E is not identified") for w in r.warnings)
    p = tmp_path / "weak.csv"
    _weak_table().to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "warning: E is not identified" in out
    strong = fit.chinchilla(published.load("chinchilla_epoch"), columns="N=N_params,D=D_tokens,C=C_flop",
                            where="epoch_outlier_excluded == 0", bootstrap=40, seed=1)
    assert all(strong.identified.values()) and not any("identified" in w for w in strong.warnings)


def test_misfitting_openlm_fit_is_flagged(validation_dir):
    d = pd.read_csv(validation_dir / "misfitting2025_openlm_final_ckpt_runs.csv")
    best = d[["N", "D", "loss"]].groupby(["N", "D"], as_index=False).min()  # the best LR per (N, D)
    r = fit.chinchilla(best, bootstrap=40, seed=0)
    # the issue: E = 1.40 with an interval from 2e-10 to 2.3, a quarter of the resamples at E = 0
    assert r.params["E"] == pytest.approx(1.40, abs=0.05)
    assert not r.identified["E"]


def test_pinning_the_asymptote_recovers_the_exponents_a_weak_design_cannot(tmp_path, capsys):
    rng = np.random.default_rng(3)
    n = 40
    N = np.exp(rng.uniform(np.log(1e7), np.log(4e7), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(4e9), n))
    loss = (1.7 + 400 / N ** 0.34 + 410 / D ** 0.28) * np.exp(rng.normal(0, 0.002, n))
    df = pd.DataFrame({"N": N, "D": D, "loss": loss})
    free = fit.chinchilla(df, bootstrap=30, seed=0)
    pinned = fit.chinchilla(df, pin={"E": 1.7}, bootstrap=30, seed=0)
    assert pinned.params["E"] == 1.7 and "E" not in pinned.identified and "E" not in pinned.ci
    # measured: free E 2.08, beta 0.375; pinned beta 0.248 (truth 0.28), and a tighter forecast
    assert abs(pinned.params["beta"] - 0.28) < abs(free.params["beta"] - 0.28)
    width = lambda r: float(np.diff(r.predict(C=1e22).iloc[0][["loss_lo", "loss_hi"]].to_numpy(float))[0])
    assert width(pinned) < 0.5 * width(free)
    assert any("pinned (not fitted): E=1.7" in n for n in pinned.notes)
    p = tmp_path / "t.csv"
    df.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--pin", "E=1.7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["E"] == 1.7
    for bad, msg in ((["--pin", "Q=1"], "not a parameter"), (["--pin", "E"], "PARAM=NUMBER"), (["--pin", "E=-1"], "positive")):
        assert main(["fit", str(p), "--law", "chinchilla", *bad]) == 2
        assert msg in capsys.readouterr().err


def test_variable_projection_recovers_a_clean_law_and_bounds_the_asymptote(tmp_path, capsys):
    from scaling.fit.varpro import chinchilla_varpro

    rng = np.random.default_rng(5)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 60))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 60))
    truth = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    df = pd.DataFrame({"N": N, "D": D, "loss": 1.7 + 400 / N ** 0.34 + 410 / D ** 0.28})
    r = chinchilla_varpro(df)
    for k, v in truth.items():
        assert r.params[k] == pytest.approx(v, rel=1e-3), k
    assert r.profile_ci["alpha"][0] <= 0.34 <= r.profile_ci["alpha"][1] and all(r.identified.values())
    # a weak design with E = 0 in truth: a prior range keeps E where it is told, and the CLI says so
    weak = _weak_table()
    rb = chinchilla_varpro(weak, E_bounds=(1.0, 2.0))
    assert 1.0 <= rb.params["E"] <= 2.0 and any("E bounded to [1, 2]" in n for n in rb.notes)
    p = tmp_path / "weak.csv"
    weak.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--method", "varpro", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert not all(res["identified"].values())  # the weak design stays flagged under varpro too
    assert main(["fit", str(p), "--law", "isoflop", "--e-bounds", "1,2"]) == 2
    assert "--e-bounds" in capsys.readouterr().err


def test_quickstart_summary_says_which_approach_to_trust(tmp_path):
    """A sweep whose loss has no floor (E = 0): approach 3 puts E on its bound, and the summary
    says to read approach 2 instead of printing the law as the answer."""
    import io as _io

    from scaling.sweep import quickstart

    d = tmp_path / "qs"
    trials = []
    i = 0
    for C in (1e17, 1e18, 1e19):
        n_opt = 0.1 * C ** 0.5
        for f in (0.25, 0.5, 1, 2, 4):
            N = n_opt * f
            D = C / (6 * N)
            tid = f"t{i}"
            i += 1
            trials.append({"trial_id": tid, "bucket": C, "d_model": 64, "n_layers": 2, "lr": 1e-3, "seed": 0})
            (d / tid).mkdir(parents=True)
            loss = 400 / N ** 0.34 + 410 / D ** 0.28
            (d / tid / "summary.json").write_text(json.dumps({"state": "done", "final_eval_loss": loss, "N": N, "D": D,
                                                              "C": C, "schema_version": 3}))
    (d / "manifest.json").write_text(json.dumps({"name": "qs", "trials": trials}))
    out = _io.StringIO()
    res = quickstart.fit_and_report(d, 1e20, stream=out)
    text = out.getvalue()
    assert not res["chinchilla"]["identified"]["E"] and res["trust"] == "approach 2", text
    assert "trust: approach 3's law is not an answer (its E is not identified" in text


def test_identifiability_judges_each_law_by_its_parameters_roles(tmp_path, capsys):
    """Good fits of other laws are not flagged: Clark's signed slopes, Krajewski's e^7 scales, a
    power law of a growing quantity (alpha < 0); and the gold-standard CLI fit prints no warning."""
    from scaling.fit import laws

    rng = np.random.default_rng(0)
    law = laws.clark()
    x = {"N": np.exp(rng.uniform(np.log(1e7), np.log(1e10), 30)), "E": rng.choice([1.0, 2.0, 8.0, 32.0, 128.0], 30)}
    r = fit.clark(pd.DataFrame({**x, "loss": law.predict(np.array([-0.082, -0.108, 0.009, 1.104]), x)}))
    assert all(r.identified.values()), r.warnings
    law = laws.krajewski()
    n = 120
    x = {"N": np.exp(rng.uniform(np.log(1e6), np.log(1e10), n)), "D": np.exp(rng.uniform(np.log(1e8), np.log(1e12), n)),
         "G": rng.choice([1.0, 2.0, 4.0, 8.0, 16.0], n)}
    theta = [np.log(2.1), 0.58, np.log(18.1), 0.115, np.log(30.8), 0.147, np.log(0.47)]
    r = fit.krajewski(pd.DataFrame({**x, "loss": law.predict(np.asarray(theta), x)}))
    assert all(r.identified.values()), r.warnings
    C = np.geomspace(1e15, 1e20, 20)
    grow = pd.DataFrame({"C": C, "loss": 1e-3 * C ** 0.3 * np.exp(rng.normal(0, 0.01, 20))})
    r = fit.powerlaw(grow, x="C", bootstrap=20)
    assert r.params["alpha"] == pytest.approx(-0.3, abs=0.01) and all(r.identified.values()), r.warnings
    p = tmp_path / "c.csv"
    published.load("chinchilla_epoch").to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--columns", "N=N_params,D=D_tokens,C=C_flop",
                 "--where", "epoch_outlier_excluded == 0"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.out and "warning" not in out.err, out


def test_varpro_prints_a_table_and_takes_a_pinned_asymptote(tmp_path, capsys):
    p = tmp_path / "weak.csv"
    _weak_table().to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--method", "varpro", "--pin", "E=1.2"]) == 0
    out = capsys.readouterr().out
    assert "least squares on relative residuals" in out and "E bounded to [1.2, 1.2]" in out
    assert main(["fit", str(p), "--law", "chinchilla", "--method", "varpro", "--e-bounds", "1,2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["params"]["E"] == pytest.approx(1.0) and res["identified"]["E"] is False  # on its prior bound
    assert main(["plot", str(p), "--figure", "frontier", "--method", "varpro", "--out", str(tmp_path / "f.png")]) == 2
