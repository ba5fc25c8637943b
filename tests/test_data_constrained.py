"""The data-constrained law (Muennighoff et al. 2023) on the shipped datablations table: the
paper's objective reproduced at its published parameters, the flat direction reported rather
than one answer claimed, the law recovering known parameters from synthetic runs, and bad input
refused in one line."""

import numpy as np
import pandas as pd
import pytest

from scaling import published
from scaling.cli import main
from scaling.errors import UsageError
from scaling.fit import data_constrained as dc

BASE = dict(A=float(np.exp(6.255414)), B=float(np.exp(7.3049974)), E=float(np.exp(0.6254804)), alpha=0.3526596,
            beta=0.3526596)  # the paper's C4 base fit (datablations utils/parametric_fit.ipynb)


@pytest.fixture(scope="module")
def datablations():
    return published.load("muennighoff2023").rename(
        columns={"N_params": "N", "D_tokens_total": "D", "U_unique_tokens": "U", "val_loss": "loss"})


def test_the_published_objective_is_reproduced_and_the_flat_direction_reported(datablations):
    df = datablations
    at_published = dc.objective(15.387756, 5.309743, BASE, df.N, df.D, df.U, df.loss)
    assert at_published == pytest.approx(0.015825936, abs=1e-7)
    assert dc.objective(28.5, 2.77, BASE, df.N, df.D, df.U, df.loss) == pytest.approx(0.0158218, abs=1e-7)
    r = dc.fit(df, base=BASE)
    assert r.objective <= 0.0158219  # at least as good as the best point known before
    assert r.n_points == 182 and r.n_repeated == 153
    # flat mostly along R_D*, and not identified: the near-optimal set spans more than 2x
    assert abs(r.flat_direction[0]) > 0.9 and r.curvature[0] < 0.1 * r.curvature[1]
    assert r.identified["R_D_star"] is False and any("R_D_star is not identified" in w for w in r.warnings)
    lo, hi = r.near_optimal["R_D_star"]
    assert hi / lo > 2
    # the published point is 0.14% worse than the optimum we find: on the same shallow valley
    assert at_published / r.objective - 1 < 2e-3


def test_known_parameters_are_recovered_from_synthetic_repeated_runs():
    rng = np.random.default_rng(0)
    N = np.repeat([1e7, 3e7, 1e8, 3e8], 12)
    U = np.tile(np.repeat([1e9, 3e9, 1e10], 4), 4)
    D = U * np.tile([1, 4, 16, 40], 12)
    truth = (12.0, 4.0)
    loss = dc.predict(N, D, U, *truth, BASE) * np.exp(rng.normal(0, 1e-4, N.size))
    r = dc.fit(pd.DataFrame({"N": N, "D": D, "U": U, "loss": loss}), base=BASE)
    assert r.R_D_star == pytest.approx(truth[0], rel=0.1) and r.R_N_star == pytest.approx(truth[1], rel=0.1)
    # a sweep directory records the corpus's tokens per epoch (unique_tokens); single-epoch runs
    # on a larger corpus saw D distinct tokens: U = min(unique_tokens, D), the same fit
    corpus = np.where(D == U, 1e12, U)
    r2 = dc.fit(pd.DataFrame({"N": N, "D": D, "unique_tokens": corpus, "loss": loss}), base=BASE)
    assert (r2.R_D_star, r2.R_N_star) == (r.R_D_star, r.R_N_star)


def test_bad_input_is_one_line(tmp_path, capsys, datablations):
    bad = datablations.head(20).copy()
    bad.loc[0, "U"] = bad.loc[0, "D"] * 2
    with pytest.raises(UsageError, match=r"U: 1 row\(s\) have more unique tokens than tokens trained"):
        dc.fit(bad, base=BASE)
    f = tmp_path / "t.csv"
    bad.to_csv(f, index=False)
    assert main(["fit", str(f), "--law", "data_constrained"]) == 2
    assert "U > D" in capsys.readouterr().err
    datablations.drop(columns=["U"]).to_csv(f, index=False)
    assert main(["fit", str(f), "--law", "data_constrained"]) == 2
    assert "missing U" in capsys.readouterr().err
