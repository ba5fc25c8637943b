"""scaling.fit.batch: McCandlish noise scale, steps/batch trade-off, B_crit(L)."""

import numpy as np
import pandas as pd
import pytest

from scaling import fit
from scaling.fit.batch import two_batch_estimates


def linear_regression_logs(d=20, sigma=0.5, b_small=8, b_big=64, steps=3000, seed=0):
    """Per-example loss 0.5 (x.w - y)^2, x ~ N(0, I), y = x.w* + N(0, sigma^2), at a fixed w.

    With v = w - w*: G = v and Sigma = v v^T + (|v|^2 + sigma^2) I, so the true
    B_simple = tr(Sigma)/|G|^2 = (|v|^2 + d(|v|^2 + sigma^2)) / |v|^2.
    """
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d) * 0.3
    vv = v @ v
    true = (vv + d * (vv + sigma**2)) / vv

    def mean_grad(B):
        X = rng.normal(size=(B, d))
        r = X @ v - rng.normal(size=B) * sigma
        return (X * r[:, None]).mean(0)

    rows = []
    for s in range(steps):
        gs, gb = mean_grad(b_small), mean_grad(b_big)
        rows.append(dict(step=s, loss=0.5 * (vv + sigma**2), gns_b_small=b_small, gns_b_big=b_big,
                         gns_g_small_sq=gs @ gs, gns_g_big_sq=gb @ gb))
    return pd.DataFrame(rows), true, vv


def test_two_batch_estimators_are_unbiased_on_linear_regression():
    logs, true, vv = linear_regression_logs()
    g2, tr = two_batch_estimates(*(logs[c] for c in ("gns_b_small", "gns_b_big", "gns_g_small_sq", "gns_g_big_sq")))
    assert g2.mean() == pytest.approx(vv, rel=0.1)
    assert tr.mean() / g2.mean() == pytest.approx(true, rel=0.1)


def test_noise_scale_within_ten_percent_of_truth():
    logs, true, _ = linear_regression_logs(seed=1)
    ns = fit.noise_scale(logs, decay=0.999)
    assert ns["B_simple"].iloc[-1] == pytest.approx(true, rel=0.10)
    # the per-step ratio of raw estimates is far noisier than the smoothed one
    assert ns["B_simple_raw"].iloc[-500:].std() > 5 * ns["B_simple"].iloc[-500:].std()


def test_noise_scale_rejects_inverted_batch_sizes():
    logs, _, _ = linear_regression_logs(steps=5)
    logs["gns_b_big"] = 4
    with pytest.raises(ValueError, match="gns_b_big"):
        fit.noise_scale(logs)


def tradeoff_table(seed=0, noise=0.02, B_star=2e5, alpha_B=0.21):
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for L in (3.0, 2.8, 2.6, 2.4, 2.2):
        Bn = B_star / L ** (1 / alpha_B)
        S_min = 2000.0 * (3.2 - L) * 10
        truth[L] = (S_min, Bn)
        for B in np.geomspace(Bn / 16, Bn * 16, 9):
            rows.append(dict(target=L, B=B, S=S_min * (1 + Bn / B) * np.exp(rng.normal(0, noise))))
    return pd.DataFrame(rows), truth


def test_tradeoff_recovers_s_min_and_b_noise():
    table, truth = tradeoff_table()
    r = fit.tradeoff(table, bootstrap=50)
    for row in r.table.itertuples():
        S_min, Bn = truth[row.target]
        assert row.S_min == pytest.approx(S_min, rel=0.10)
        assert row.B_crit == pytest.approx(Bn, rel=0.10)
        assert row.E_min == pytest.approx(S_min * Bn, rel=0.2)
        assert row.B_crit_lo < row.B_crit < row.B_crit_hi
    # Kaplan et al. 2020 eq. 5.3 form across the targets
    assert r.params["alpha_B"] == pytest.approx(0.21, rel=0.10)
    assert r.params["B_star"] == pytest.approx(2e5, rel=0.3)
    assert r.predict([2.5])["B_crit"][0] == pytest.approx(2e5 / 2.5 ** (1 / 0.21), rel=0.1)


def test_steps_to_target_from_logs_then_tradeoff():
    # loss curves L(s) = 2 + 10 / (s / S_min(B))^0.5 reach target t at s = S_min(B) * (10/(t-2))^2
    B_noise, S1 = 256.0, 100.0
    rows = []
    for B in (32, 64, 128, 256, 512, 1024, 2048):
        s_min = S1 * (1 + B_noise / B)
        steps = np.arange(10, 200_000, 10, dtype=float)
        loss = 2 + 10 / np.sqrt(steps / s_min)
        rows += [dict(run=f"b{B}", B=float(B), step=s, loss=l) for s, l in zip(steps, loss)]
    logs = pd.DataFrame(rows)
    st = fit.steps_to_target(logs, [3.0, 2.5])
    got = st[(st.target == 3.0) & (st.B == 256.0)]["S"].iloc[0]
    assert got == pytest.approx(S1 * 2 * 100, rel=0.01)
    r = fit.tradeoff(st)
    # at every target S scales with S_min(B) by the same factor, so B_noise is the same 256
    assert np.allclose(r.table["B_crit"], B_noise, rtol=0.05)


def test_minimum_compute_adjustment_at_b_equal_b_crit_halves_compute():
    table, _ = tradeoff_table()
    r = fit.tradeoff(table)
    L = np.array([2.5, 2.3])
    bc = r.predict(L)["B_crit"].to_numpy()
    runs = pd.DataFrame({"loss": L, "B": bc, "C": [1e18, 2e18], "S": [1000.0, 3000.0]})
    out = fit.to_minimum_compute(runs, r)
    # at B = B_crit a run spends twice the minimum compute and twice the minimum steps
    np.testing.assert_allclose(out["C_min"], [0.5e18, 1e18], rtol=1e-9)
    np.testing.assert_allclose(out["S_min"], [500.0, 1500.0], rtol=1e-9)


def test_the_train_step_measures_a_known_noise_scale():
    """Known truth through the real train step (accumulation, statistics, then the fit): a
    unigram model (logits = a bias b, b = 0) at lr 0 on targets drawn i.i.d. from p. The
    per-token gradient is softmax(b) - e_y = u - e_y, so G = u - p and tr(Sigma_token) = 1 - |p|^2;
    a sequence of L tokens has B_simple = (1 - |p|^2) / (L |u - p|^2) sequences."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from scaling.train import step as step_lib

    V, L, B, K, steps = 16, 8, 64, 8, 300

    class Unigram(nnx.Module):
        def __init__(self):
            self.b = nnx.Param(jnp.zeros(V))

        def __call__(self, tokens, train=True, mod_routing="topk"):
            return jnp.broadcast_to(self.b[...], (*tokens.shape, V)), {}

    p = 1.0 / np.arange(1, V + 1) ** 1.2
    p /= p.sum()
    u = np.full(V, 1 / V)
    truth = (1 - p @ p) / (L * (u - p) @ (u - p))
    graphdef, params, rest = step_lib.split_model(Unigram())
    tx = optax.sgd(0.0)
    state = step_lib.init_state(params, rest, tx, total_steps=steps)
    train = step_lib.make_train_step(graphdef, tx, z_loss_weight=0.0, accum=K, gns_every=1)
    rng = np.random.default_rng(0)
    rows = []
    for s in range(steps):
        y = rng.choice(V, size=(B, L), p=p).astype(np.int32)
        state, m = train(state, {"inputs": jnp.zeros((B, L), jnp.int32), "targets": jnp.asarray(y)})
        rows.append({"step": s + 1, **{k: float(v) for k, v in jax.device_get(m).items()}})
    logs = pd.DataFrame(rows)
    assert logs["gns_b_small"].iloc[0] == B // K and logs["gns_b_big"].iloc[0] == B
    est = fit.noise_scale_window(logs, start=0.0)
    assert est["B_simple"].iloc[0] == pytest.approx(truth, rel=0.10)
    assert est["B_simple_lo"].iloc[0] < truth < est["B_simple_hi"].iloc[0]


def test_noise_scale_never_pools_runs():
    """Two runs with noise scales 10x apart: each run's EMA and window estimate is its own."""
    a, true_a, _ = linear_regression_logs(d=5, seed=2, steps=2000)
    b, true_b, _ = linear_regression_logs(d=50, seed=3, steps=2000)
    assert true_b > 5 * true_a
    both = pd.concat([a.assign(trial_id="a"), b.assign(trial_id="b")]).sort_values("step")
    ns = fit.noise_scale(both, decay=0.998)
    last = ns.groupby("trial_id")["B_simple"].last()
    assert last["a"] == pytest.approx(true_a, rel=0.15) and last["b"] == pytest.approx(true_b, rel=0.15)
    win = fit.noise_scale_window(both).set_index("trial_id")
    assert win.loc["a", "B_simple"] == pytest.approx(true_a, rel=0.15)
    assert win.loc["b", "B_simple"] == pytest.approx(true_b, rel=0.15)


def _sweep_dir(root, S_inf=20.0, B_noise=4096.0, L=32):
    """A batch-size sweep as the trainer leaves it: per batch size B (tokens) two learning rates,
    the better one on eval curves ``2 + (s / S_min(B))^-0.5`` (S_min(B) = S_inf (1 + B_noise/B)),
    the worse one 20% slower; training losses one noisy batch each (their running minimum would
    reach every target early)."""
    import json

    rng = np.random.default_rng(0)
    for b_seq in (16, 32, 64, 128, 256):
        B = b_seq * L
        for lr, slow in ((1e-3, 1.2), (3e-3, 1.0)):
            d = root / f"b{b_seq}_lr{lr:g}"
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps({"data": {"batch_size": b_seq, "seq_len": L}}))
            (d / "trial.json").write_text(json.dumps({"trial_id": d.name, "batch": b_seq, "lr": lr}))
            rows = []
            for s in range(10, 4001, 10):
                ev = 2 + (s / (slow * S_inf * (1 + B_noise / B))) ** -0.5
                row = {"step": s, "tokens": s * B, "loss": ev + rng.normal(0, 0.5 / np.sqrt(b_seq))}
                if s % 20 == 0:
                    row["eval_loss"] = ev
                rows.append(row)
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "summary.json").write_text(json.dumps({"state": "done", "final_eval_loss": rows[-1]["eval_loss"],
                                                        "steps": 4000, "schema_version": 3}))
    return root


def test_bcrit_from_a_sweep_directory_reads_eval_curves_and_keeps_the_best_lr(tmp_path, capsys):
    """``scaling fit SWEEP --law bcrit``: steps to each target read on the held-out curve
    (interpolated between evaluations, not the running minimum of the training loss), the best lr
    per batch size, B in tokens; B_noise recovered; a target no batch size reaches is reported as
    unusable, not an error; one batch size is one line, exit 2."""
    import json

    from scaling.cli import main

    root = _sweep_dir(tmp_path / "sweep")
    r = fit.tradeoff(str(root), targets=[2.8, 2.6, 2.45, 2.3, 1.5])
    assert list(r.table["target"]) == [2.8, 2.6, 2.45, 2.3]
    np.testing.assert_allclose(r.table["B_crit"], 4096.0, rtol=0.05)  # tokens
    np.testing.assert_allclose(r.table["S_min"], 20.0 / (r.table["target"] - 2) ** 2, rtol=0.05)
    assert r.unusable == [{"target": 1.5, "n": 0, "status": "unusable: reached at 0 batch size(s), 3 needed"}]
    assert main(["fit", str(root), "--law", "bcrit", "--targets", "2.8,2.6,2.45,1.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["targets"]) == 3 and d["unusable_targets"][0]["target"] == 1.5
    one = tmp_path / "one"
    one.mkdir()
    for d in (root / "b16_lr0.001", root / "b16_lr0.003"):
        (one / d.name).symlink_to(d)
    assert main(["fit", str(one), "--law", "bcrit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one batch size" in err and len(err.splitlines()) == 1
    assert main(["fit", str(root), "--law", "bcrit", "--targets", "2.8,x"]) == 2
    assert "--targets" in capsys.readouterr().err


def test_a_bcrit_beyond_the_batch_sizes_run_is_unresolved_and_left_out_of_the_law():
    """Three targets with B_crit inside the batch sizes run, one whose points all lie in the
    linear regime (S B constant): that one is reported unresolved (its row kept, its reason
    given) and B_crit(L) is fitted on the other three."""
    rows = []
    Bs = np.array([512.0, 1024, 2048, 4096, 8192])
    for t, s_min, b_crit in ((2.0, 100.0, 2000.0), (1.9, 150.0, 3000.0), (1.8, 200.0, 4500.0)):
        rows += [{"target": t, "B": B, "S": s_min * (1 + b_crit / B)} for B in Bs]
    rows += [{"target": 1.7, "B": B, "S": 3e6 / B} for B in Bs[:3]]
    r = fit.tradeoff(pd.DataFrame(rows))
    status = dict(zip(r.table["target"], r.table["status"]))
    assert status[2.0] == status[1.9] == status[1.8] == "fitted"
    assert status[1.7].startswith("unresolved: B_crit") and "512-2048" in status[1.7]
    np.testing.assert_allclose(r.table.set_index("target").loc[[2.0, 1.9, 1.8], "B_crit"], [2000, 3000, 4500], rtol=1e-3)
    assert r.law is not None and r.law.n_points == 3


def _branch_table(cbs_of_D, Ds=(6.4e4, 2.56e5, 1.024e6, 4.096e6), factors=(1, 2, 4, 8, 16, 32), b0=8, L=128,
                  noise=0.0, seed=0):
    """Branches as a cbs_branch sweep's run table has them: per branch point D, the loss after the
    branch is ``ref * (1 + excess)`` with excess = 0.01 (1 + log2(B / CBS(D))), floored at 0: it
    crosses 1% exactly at CBS(D) and is linear in log B from CBS/2 up (the grid's spacing)."""
    rng = np.random.default_rng(seed)
    rows = []
    for D in Ds:
        ref = 3.0 - 0.2 * np.log10(D)
        for k in factors:
            B = k * b0 * L
            excess = 0.0 if k == 1 else max(0.0, 0.01 * (1 + np.log2(B / cbs_of_D(D))))
            rows.append({"main": "m", "cbs_at_tokens": D, "cbs_factor": k, "cbs_batch": k * b0, "seq_len": L,
                         "loss": ref * (1 + excess) * (1 + (rng.normal(0, noise) if k > 1 else 0.0)),
                         "state": "done"})
    return pd.DataFrame(rows)


def test_branched_cbs_recovers_the_crossing_and_its_power_law_in_tokens():
    """Known truth: CBS(D) = 2500 (D / 64K)^0.4 tokens. Without noise each branch point's CBS and
    the exponent come back to float precision; with 0.1% loss noise the 95% interval on p holds
    0.4. A diverged largest batch fails the tolerance (no interpolation towards it); a point
    where every batch stays within tolerance is a lower bound, kept out of the law."""
    truth = lambda D: 2500.0 * (D / 6.4e4) ** 0.4  # noqa: E731
    r = fit.branched_cbs(_branch_table(truth))
    np.testing.assert_allclose(r.table["cbs"], [truth(D) for D in r.table["D"]], rtol=1e-9)
    assert list(r.table["status"]) == ["resolved"] * 4
    assert r.params["p"] == pytest.approx(0.4, abs=1e-9) and r.params["A"] * 6.4e4 ** 0.4 == pytest.approx(2500.0)
    noisy = fit.branched_cbs(_branch_table(truth, noise=1e-3, seed=1))
    lo, hi = noisy.ci["p"]
    assert lo < 0.4 < hi and abs(noisy.params["p"] - 0.4) < 0.15
    t = _branch_table(truth)
    t.loc[(t["cbs_at_tokens"] == 6.4e4) & (t["cbs_factor"] >= 2), "state"] = "diverged"
    assert fit.branched_cbs(t).table.iloc[0]["cbs"] == 1024.0  # the k=1 batch: every larger one diverged
    # unfinished branches: above the crossing they change nothing; at or below it the point is
    # incomplete (out of the law), never a lower bound from a silently shorter grid
    t = _branch_table(truth)
    t.loc[(t["cbs_at_tokens"] == 6.4e4) & (t["cbs_factor"] == 32), "state"] = "running"
    t.loc[(t["cbs_at_tokens"] == 4.096e6) & (t["cbs_factor"] >= 16), "state"] = "failed"
    part = fit.branched_cbs(t).table.set_index("D")
    assert part.loc[6.4e4, "status"] == "resolved" and part.loc[6.4e4, "cbs"] == pytest.approx(truth(6.4e4))
    assert part.loc[4.096e6, "status"].startswith("incomplete") and part.loc[4.096e6, "unfinished"] == [16384.0, 32768.0]
    t.loc[(t["cbs_at_tokens"] == 2.56e5) & (t["cbs_factor"] == 1), "state"] = "pending"
    assert "smallest batch" in fit.branched_cbs(t).table.set_index("D").loc[2.56e5, "status"]
    # two seeds of one design: averaged per (point, batch), one law
    a, b = _branch_table(truth, noise=1e-3, seed=2), _branch_table(truth, noise=1e-3, seed=3).assign(main="m2")
    mains = pd.DataFrame([{"role": "main", "trial_id": m, "shape": "d48L2", "batch": 8, "seq_len": 128, "lr": 4e-3,
                           "seed": i, "loss": 2.0, "state": "done"} for i, m in enumerate(("m", "m2"))])
    two = fit.branched_cbs(pd.concat([mains, a, b], ignore_index=True))
    assert list(two.table["n_seeds"]) == [2] * 4 and two.law is not None
    avg = (a["loss"].to_numpy() + b["loss"].to_numpy()) / 2
    ref = avg[(a["cbs_at_tokens"] == 6.4e4).to_numpy() & (a["cbs_factor"] == 1).to_numpy()][0]
    assert two.table.iloc[0]["reference_loss"] == pytest.approx(ref)
    wide = fit.branched_cbs(_branch_table(lambda D: 1e6))
    assert set(wide.table["status"]) == {"lower bound"} and wide.law is None
    assert any("3 resolved branch points" in n for n in wide.notes)


def test_scaling_fit_law_cbs_from_the_command_line(tmp_path, capsys):
    """``scaling fit TABLE --law cbs``: the per-point CBS and p with its interval; --predict D=...;
    --tolerance outside (0, 1), a branch point with one batch, --tolerance with another law: one
    line, exit 2."""
    import json

    from scaling.cli import main

    truth = lambda D: 2500.0 * (D / 6.4e4) ** 0.4  # noqa: E731
    path = tmp_path / "branches.csv"
    _branch_table(truth).to_csv(path, index=False)
    assert main(["fit", str(path), "--law", "cbs", "--predict", "D=1e7", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["p"] == pytest.approx(0.4) and d["tolerance"] == 0.01
    assert d["predictions"][0]["cbs"] == pytest.approx(truth(1e7))
    # a looser tolerance puts every CBS higher
    assert main(["fit", str(path), "--law", "cbs", "--tolerance", "0.02", "--json"]) == 0
    d2 = json.loads(capsys.readouterr().out)
    assert all(b["cbs"] > a["cbs"] for a, b in zip(d["branch_points"], d2["branch_points"]))
    for argv, word in ((["--tolerance", "1.5"], "--tolerance"), (["--law", "bcrit", "--tolerance", "0.01"], "--tolerance")):
        law = [] if "--law" in argv else ["--law", "cbs"]
        assert main(["fit", str(path), *law, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and len(err.splitlines()) == 1
    one = _branch_table(truth)
    one[one["cbs_factor"] == 1].to_csv(tmp_path / "one.csv", index=False)
    assert main(["fit", str(tmp_path / "one.csv"), "--law", "cbs"]) == 2
    assert "one batch size" in capsys.readouterr().err
