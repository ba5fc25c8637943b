"""The multi-power law (Luo et al. 2025) over lr schedules: known curves recovered and unseen
schedules predicted, the loss-drop term zero for a constant schedule, bad input refused."""

import numpy as np
import pytest

from scaling.errors import UsageError
from scaling.fit import curves

TRUTH = np.log([1.2, 2.0, 0.45, 300.0, 2.0, 0.6, 0.6])  # L0, A, alpha, B, C, beta, gamma


def schedule(kind, T, peak=3e-3, warm=50):
    t = np.arange(1, T + 1)
    lr = np.full(T, peak)
    lr[:warm] = peak * t[:warm] / warm
    if kind == "cos":
        p = (t[warm:] - warm) / (T - warm)
        lr[warm:] = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)))
    if kind == "wsd":
        d = int(0.2 * T)
        lr[T - d:] = peak * (1 - 0.9 * (t[T - d:] - (T - d)) / d)
    return lr


def truth(lr, steps):
    return curves.predict_terms(TRUTH, *curves._terms(lr, np.asarray(steps)))


def test_the_loss_drop_is_zero_for_constant_lr_and_positive_after_a_decay():
    const, cos = schedule("const", 500), schedule("cos", 500)
    S1, dk, *_ = curves._terms(const, np.array([500]))
    assert dk.size == 0 and S1[0] == pytest.approx(const.sum())
    no_drop = curves.predict_terms(TRUTH, *curves._terms(const, np.array([500])))[0]
    L0, A, al = np.exp(TRUTH[:3])
    assert no_drop == pytest.approx(L0 + A * const.sum() ** -al)
    assert truth(cos, [500])[0] < L0 + A * cos.sum() ** -al  # the decay bought a drop


def test_unseen_schedules_are_predicted_from_constant_and_cosine_curves():
    rng = np.random.default_rng(0)
    fitted = []
    for name, lr in (("c3", schedule("const", 1000)), ("c1", schedule("const", 1000, 1e-3)), ("cos", schedule("cos", 1000))):
        steps = np.arange(25, 1001, 25)
        fitted.append(curves.Curve(name, lr, steps, truth(lr, steps) * np.exp(rng.normal(0, 1e-3, steps.size))))
    r = curves.fit(fitted, warmup_skip=50, grid={"B": (1e2,), "C": (2.0,), "gamma": (0.7,)})
    assert r.objective < 3e-6  # at the noise floor (1e-3 relative noise)
    assert r.params["L0"] == pytest.approx(1.2, rel=0.05) and r.params["alpha"] == pytest.approx(0.45, rel=0.1)
    for kind, T in (("wsd", 1000), ("cos", 2000)):
        lr = schedule(kind, T)
        assert r.predict_curve(lr, [T])[0] == pytest.approx(truth(lr, [T])[0], rel=0.01)


def test_bad_input_is_one_line():
    with pytest.raises(UsageError, match="lr: a curve needs logged learning-rate values"):
        curves.schedule_from_log([10, 20], [np.nan, 1e-3])
    const = curves.Curve("c", schedule("const", 300), np.arange(60, 301, 20), np.linspace(3, 2, 13))
    with pytest.raises(UsageError, match="loss-drop term cannot be fitted"):
        curves.fit([const], warmup_skip=50)
    r = curves.MultiPowerFit({}, 0.0, {}, 0, TRUTH)
    with pytest.raises(UsageError, match="steps: must be within 1..300"):
        r.predict_curve(schedule("const", 300), [301])


def test_the_annealing_law_fits_and_predicts_its_own_curves():
    """Tissue et al.'s L0 + A S1^-alpha - C S2: curves made by the law are fitted back and an
    unseen schedule predicted."""
    theta = np.log([1.2, 2.0, 0.45, 0.3])
    def law(lr, steps):
        return curves.predict_annealing(theta, *curves._annealing_terms(lr, np.asarray(steps)))
    fitted = [curves.Curve(n, lr, np.arange(25, 1001, 25), law(lr, np.arange(25, 1001, 25)))
              for n, lr in (("c3", schedule("const", 1000)), ("cos", schedule("cos", 1000)))]
    r = curves.fit(fitted, warmup_skip=50, law="annealing")
    assert r.law == "annealing" and r.params["C"] == pytest.approx(0.3, rel=0.02)
    lr = schedule("wsd", 1000)
    assert r.predict_curve(lr, [1000])[0] == pytest.approx(law(lr, [1000])[0], rel=1e-3)


def _run_dir(path, lr, steps, loss, config=None):
    """A run directory as the trainer leaves it, reduced to what ``runs.load_steps`` reads."""
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {}))
    rows = [{"step": int(s), "lr": float(lr[s - 1]), "eval_loss": float(y)} for s, y in zip(steps, loss)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_scaling_curves_fits_runs_and_predicts_a_run_and_a_schedule_file(tmp_path, capsys):
    import json

    from scaling.cli import main

    steps = np.arange(25, 1001, 25)
    dirs = {k: _run_dir(tmp_path / k, schedule(k, 1000), steps, truth(schedule(k, 1000), steps)) for k in ("const", "cos", "wsd")}
    (tmp_path / "cos2000.txt").write_text("\n".join(map(str, schedule("cos", 2000))))
    assert main(["curves", dirs["const"], dirs["cos"], "--predict", dirs["wsd"], "--predict", str(tmp_path / "cos2000.txt"),
                 "--skip", "50", "--json", "--plot", str(tmp_path / "fig.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    wsd, cos2 = out["predictions"]
    assert wsd["name"] == "wsd" and abs(wsd["rel_error"]) < 0.01  # an exact world: the law recovers it
    assert cos2["predicted"] == pytest.approx(truth(schedule("cos", 2000), [2000])[0], rel=0.01)
    assert (tmp_path / "fig.png").stat().st_size > 0
    # bad input: constant runs only, a schedule file with a negative lr, a missing path: one line, exit 2
    (tmp_path / "bad.txt").write_text("0.001\n-0.002\n")
    for argv, msg in (([dirs["const"]], "loss-drop term cannot be fitted"),
                      ([dirs["const"], dirs["cos"], "--predict", str(tmp_path / "bad.txt")], "finite lr >= 0"),
                      ([dirs["const"], dirs["cos"], "--predict", str(tmp_path / "nope")], "neither a run directory")):
        assert main(["curves", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1


def test_scaling_curves_names_runs_apart_scores_the_last_evaluation_and_refuses_mixed_shapes(tmp_path, capsys):
    """Two runs named alike in different folders stay two curves; a run whose last evaluation
    precedes its last step is scored there (not 'observed nan'); runs of two shapes, a non-UTF-8
    or all-zero schedule file: one line, exit 2."""
    import json

    from scaling.cli import main

    steps = np.arange(25, 1001, 25)
    shape = {"model": {"d_model": 48, "n_layers": 2}, "data": {"batch_size": 16, "seq_len": 128}}
    a = _run_dir(tmp_path / "a" / "run", schedule("const", 1000), steps, truth(schedule("const", 1000), steps), shape)
    b = _run_dir(tmp_path / "b" / "run", schedule("cos", 1000), steps, truth(schedule("cos", 1000), steps), shape)
    wsd = _run_dir(tmp_path / "wsd", schedule("wsd", 1000), steps, truth(schedule("wsd", 1000), steps), shape)
    rows = [json.loads(line) for line in (tmp_path / "wsd" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # logged every 25 steps to step 1000, evaluated last at step 950
        if r["step"] > 950:
            del r["eval_loss"]
    (tmp_path / "wsd" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # one fit: a fitted run predicted too (an in-sample check)
    assert main(["curves", a, b, "--predict", wsd, "--predict", b, "--skip", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["rmse_log"]) == sorted([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")])
    p, pb = out["predictions"]
    assert pb["name"] == str(tmp_path / "b" / "run")
    assert p["observed_step"] == 950 and p["steps"] == 1000
    assert p["observed"] == pytest.approx(truth(schedule("wsd", 1000), [950])[0])
    assert abs(p["rel_error"]) < 0.01  # scored against the law's value at step 950, not at 1000

    wide = {**shape, "model": {"d_model": 64, "n_layers": 2}}
    c = _run_dir(tmp_path / "wide", schedule("wsd", 1000), steps, truth(schedule("wsd", 1000), steps), wide)
    (tmp_path / "latin1.txt").write_bytes("0.001\n\xe9\n".encode("latin-1"))
    (tmp_path / "zeros.json").write_text(json.dumps([0.0] * 100))
    for argv, msg in (([a, b, "--predict", c], "model.d_model is 48 in"),
                      ([a, b, "--predict", str(tmp_path / "latin1.txt")], "not UTF-8 text"),
                      ([a, b, "--predict", str(tmp_path / "zeros.json")], "every lr is 0"),
                      ([a, a], "is given twice")):
        assert main(["curves", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
