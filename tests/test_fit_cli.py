"""`scaling fit` / `scaling plot` / `scaling bench fit` through scaling.cli.main: outputs and exit codes."""

import json

import numpy as np
import pandas as pd
import pytest

from scaling.cli import main
from scaling.fit import laws

LAW = laws.chinchilla()
THETA = np.array([np.log(406.4), np.log(410.7), np.log(1.69), 0.34, 0.28])
A_TRUE = 0.28 / 0.62


def runs_table(seed=0, budgets=np.geomspace(1e17, 1e21, 5), sizes=9):
    rng = np.random.default_rng(seed)
    G = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    rows = []
    for C in budgets:
        for N in G * (C / 6) ** A_TRUE * np.geomspace(0.1, 10, sizes):
            rows.append({"C_flop": C, "N_params": N, "D_tokens": C / (6 * N)})
    df = pd.DataFrame(rows)
    x = {"N": df["N_params"].to_numpy(), "D": df["D_tokens"].to_numpy()}
    df["loss"] = LAW.predict(THETA, x) * np.exp(rng.normal(0, 0.001, len(df)))
    df["state"] = "done"
    return df


COLS = "N=N_params,D=D_tokens,C=C_flop"


@pytest.fixture
def table(tmp_path):
    p = tmp_path / "runs.csv"
    runs_table().to_csv(p, index=False)
    return p


def _json(capsys):
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_fit_isoflop_json_with_bootstrap_prediction_and_backtest(table, capsys):
    rc = main(["fit", str(table), "--law", "isoflop", "--columns", COLS, "--bootstrap", "40",
               "--predict", "C=1e22,1e23", "--holdout-largest", "1", "--json"])
    assert rc == 0
    d = _json(capsys)
    assert d["a"] == pytest.approx(A_TRUE, abs=0.02) and d["b"] == pytest.approx(1 - A_TRUE, abs=0.02)
    assert d["ci"]["a"][0] < d["a"] < d["ci"]["a"][1]
    assert [p["C"] for p in d["predictions"]] == [1e22, 1e23]
    assert d["predictions"][0]["N_opt_lo"] < d["predictions"][0]["N_opt"] < d["predictions"][0]["N_opt_hi"]
    bt = d["backtest"]
    assert bt["holdout_budgets"] == [pytest.approx(1e21)] and abs(bt["rows"][0]["log_err_N"]) < 0.1


def test_fit_chinchilla_prints_table_and_reports_excluded_runs(tmp_path, capsys):
    df = runs_table()
    df.loc[[0, 5], "state"] = "diverged"
    df.loc[[0, 5], "loss"] = np.nan  # diverged runs carry no loss: must be dropped, not rejected
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    assert main(["fit", str(p), "--law", "chinchilla", "--columns", COLS, "--json"]) == 0
    d = _json(capsys)
    assert d["n_points"] == len(df) - 2 and d["n_starts"] == 4500
    assert d["params"]["alpha"] == pytest.approx(0.34, abs=0.01)
    assert d["a"] == pytest.approx(A_TRUE, abs=0.01)
    assert any("excluded 2 run(s)" in n for n in d["notes"])
    assert main(["fit", str(p), "--law", "isoflop", "--columns", COLS, "--predict", "C=1e22"]) == 0
    out = capsys.readouterr().out
    assert "N_coef" in out and "objective" in out and "prediction: C=1e+22" in out and "excluded 2 run(s)" in out


def _write(tmp_path, df, name="t.csv"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        df.to_json(p, orient="records", lines=True)
    else:
        df.to_csv(p, index=False)
    return str(p)


@pytest.mark.parametrize(
    "mutate, args, message",
    [
        (lambda d: d.assign(loss=d["loss"].where(d.index != 3, np.nan)), ["--law", "chinchilla"], "NaN/inf"),
        (lambda d: d.assign(loss=d["loss"].where(d.index != 3, np.inf)), ["--law", "isoflop"], "NaN/inf"),
        (lambda d: d.assign(N_params=d["N_params"].where(d.index != 2, -5.0)), ["--law", "chinchilla"], "non-positive"),
        (lambda d: d.drop(columns=["D_tokens"]), ["--law", "krajewski"], "missing column"),
        (lambda d: d.head(5), ["--law", "chinchilla"], "need at least 6"),
        (lambda d: d[d["C_flop"] == d["C_flop"].max()], ["--law", "isoflop"], "one compute budget"),
        (lambda d: d.assign(state="diverged"), ["--law", "chinchilla"], "no run finished"),
        (lambda d: d, ["--law", "chinchilla", "--where", "nonexistent_col > 3"], "--where"),
        (lambda d: d, ["--law", "isoflop", "--holdout-largest", "5"], "cannot hold out 5"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, mutate, args, message):
    path = _write(tmp_path, mutate(runs_table()), "t.jsonl")
    cols = COLS if "krajewski" not in args else "N=N_params,C=C_flop"
    rc = main(["fit", path, "--columns", cols, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_columns_and_missing_file_exit_2(tmp_path, capsys):
    path = _write(tmp_path, runs_table())
    assert main(["fit", path, "--law", "chinchilla", "--columns", "N=nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "absent.csv"), "--law", "chinchilla"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plots_are_log_scaled_labelled_and_written(tmp_path, capsys):
    from scaling import fit

    path = _write(tmp_path, runs_table())
    out = tmp_path / "iso.png"
    assert main(["plot", path, "--figure", "isoflop", "--columns", COLS, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    df = runs_table().rename(columns={"N_params": "N", "D_tokens": "D", "C_flop": "C"})
    r = fit.isoflop(df, bootstrap=20)
    fig = fit.plots.nopt(r)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "FLOPs" in ax.get_xlabel() and "parameters" in ax.get_ylabel()
    assert any(f"C^{r.a:.3f}" in t.get_text() for t in ax.get_legend().get_texts())
    fig = fit.plots.isoflop(r)
    assert len([c for c in fig.axes[0].collections if len(c.get_offsets()) == 1]) == 5  # one star per minimum
    moe = pd.DataFrame([{"N": n, "E": e, "loss": float(np.exp(-0.08 * np.log(n) - 0.1 * np.log(e) + 0.009 * np.log(n) * np.log(e) + 1.1))}
                        for n in np.geomspace(1e7, 1e9, 5) for e in (1, 8, 64)])
    fig = fit.plots.moe(moe, by="E", fit=fit.clark(moe))
    assert len(fig.axes[0].get_lines()) == 3 and "log L" in fig.axes[0].get_title()
    out2 = tmp_path / "moe.png"
    assert main(["plot", _write(tmp_path, moe, "moe.csv"), "--figure", "moe", "--out", str(out2)]) == 0
    assert out2.stat().st_size > 10_000


def test_fit_bcrit_from_tradeoff_table(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for L in (3.0, 2.7, 2.4, 2.1):
        Bn = 2e5 / L ** (1 / 0.21)
        for B in np.geomspace(Bn / 10, Bn * 10, 7):
            rows.append(dict(loss=L, B=B, S=1000 * (1 + Bn / B) * np.exp(rng.normal(0, 0.01))))
    path = _write(tmp_path, pd.DataFrame(rows))
    png = tmp_path / "b.png"
    assert main(["fit", path, "--law", "bcrit", "--json", "--plot", str(png), "--predict", "loss=2.5"]) == 0
    d = _json(capsys)
    assert d["params"]["alpha_B"] == pytest.approx(0.21, rel=0.05)
    assert d["predictions"][0]["B_crit"] == pytest.approx(2e5 / 2.5 ** (1 / 0.21), rel=0.05)
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_bench_fit_reports_both_timings(capsys):
    assert main(["bench", "fit", "--json", "--scipy-starts", "3", "--bootstrap", "20"]) == 0
    d = _json(capsys)
    assert d["objective"] == pytest.approx(1.01827403e-3, rel=1e-5)
    assert d["n_starts"] == 4500 and d["scipy_extrapolated"] and d["bootstrap_converged"] == 20
    assert d["speedup_vs_scipy"] == pytest.approx(d["scipy_numgrad_s"] / d["fit_s"], rel=0.05)


def test_fit_reads_a_sweep_directory(tmp_path, capsys):
    pytest.importorskip("scaling.sweep.store")
    df = runs_table()
    for i, r in enumerate(df.itertuples()):
        d = tmp_path / f"t{i:03d}"
        d.mkdir()
        state = "diverged" if i == 7 else "done"
        summary = {"state": state, "N": r.N_params, "D": r.D_tokens, "C": r.C_flop * (1 + 0.02 * ((i % 3) - 1)),
                   "final_eval_loss": r.loss if state == "done" else None}
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "trial.json").write_text(json.dumps({"trial_id": d.name, "bucket": r.C_flop}))
    assert main(["fit", str(tmp_path), "--law", "isoflop", "--json"]) == 0
    out = _json(capsys)
    assert out["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert sum(t["n_points"] for t in out["table"]) == len(df) - 1
    assert any("excluded 1 run(s)" in n for n in out["notes"])


def test_fit_envelope_from_per_step_logs(tmp_path, capsys):
    rows = []
    for i, N in enumerate(np.geomspace(1e7, 1e10, 16)):
        D = np.geomspace(1e8, 2e12, 60)
        L = LAW.predict(THETA, {"N": np.full_like(D, N), "D": D})
        rows += [{"trial_id": f"r{i}", "N": N, "tokens": d, "C": 6 * N * d, "loss": l} for d, l in zip(D, L)]
    path = _write(tmp_path, pd.DataFrame(rows), "steps.csv")
    png = tmp_path / "nopt.png"
    assert main(["fit", path, "--law", "isoflop", "--method", "envelope", "--json", "--plot", str(png)]) == 0
    d = _json(capsys)
    assert d["law"] == "isoflop-1" and d["a"] == pytest.approx(A_TRUE, abs=0.03)
    assert png.stat().st_size > 10_000
