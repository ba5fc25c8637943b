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
