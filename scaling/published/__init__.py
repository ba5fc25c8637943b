"""Published scaling-law data shipped with the package, loadable by name.

``published.load("chinchilla_epoch")`` -> a pandas DataFrame (the ``.json`` tables,
``chinchilla_epoch_fits`` and ``porian2024_fits``: their parsed JSON), ``published.names()``, ``published.provenance(name)`` (origin repository and commit,
the paper, how the file was made, its sha256 and what is known of its licence). The files are
copies of those described in the project's ``shared/validation/SOURCES.md``; nothing here was
measured by this project. Tests and the reproduction notebook use them, so they run on a fresh
clone. numpy/pandas only (the fitter's floor).

Licences: the origin repositories' licences were not recorded when the files were collected
(``SOURCES.md`` gives origin and commit, not licence). The tables are measurements reported in
the cited papers, shipped for reproduction with attribution; check the origin repository
before redistributing them outside this package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from scaling.errors import UsageError

DATA = Path(__file__).resolve().parent / "data"
LICENCE_NOTE = ("not recorded at collection (shared/validation/SOURCES.md lists origin and commit only); "
                "measurements reported in the cited paper, shipped for reproduction with attribution")


@dataclass(frozen=True)
class Table:
    file: str
    paper: str
    origin: str
    made: str
    rows: int
    columns: str
    sha256: str = ""  # of the shipped file, recorded when it was copied in
    licence: str = LICENCE_NOTE


TABLES = {
    "chinchilla_epoch": Table(
        file="chinchilla_epoch.csv", sha256="586c56d6f7f304b6fe7d7a71e3c3c57af920ec19e6a61310392651a606863696",
        paper="Hoffmann et al. 2022 (Chinchilla), runs extracted by Besiroglu et al. 2024 (Epoch AI, arXiv:2404.10102)",
        origin="github.com/epoch-research/analyzing-chinchilla @ 92258837425e1b5f2851d624287f0120583a3d0e, "
               "data/svg_extracted_data.csv (last changed d8197ca6a73a6ce9095584137681282d804c6a7c)",
        made="Epoch's transform of the SVG extraction: D = C / (6 N); epoch_outlier_excluded = 1 for the 5 "
             "highest-loss runs Epoch drops (240 kept)",
        rows=245, columns="N_params, D_tokens, C_flop, loss, epoch_outlier_excluded"),
    "chinchilla_epoch_fits": Table(
        file="chinchilla_epoch_fits.json", sha256="9a4ee9f6e35b75da6fdef22191abaf6ca5512e4c6a2c92d40b787047189851e5",
        paper="Hoffmann et al. 2022 (approach 3) and Besiroglu et al. 2024 (Epoch's refit)",
        origin="github.com/epoch-research/analyzing-chinchilla @ 92258837425e1b5f2851d624287f0120583a3d0e, "
               "data_analysis.ipynb (cells 16, 18, 24-26, 46-49, 54, 59, 63-66)",
        made="the published coefficients of the chinchilla_epoch table: Hoffmann's rounded and unrounded "
             "values, Epoch's Huber-grid L-BFGS fit, MLE, bootstrap SEs and 95% intervals",
        rows=2, columns="hoffmann2022_chinchilla_approach3, besiroglu2024_epoch_refit"),
    "porian2024_isoflop": Table(
        file="porian2024_isoflop.csv", sha256="f5870ae56bc4b460aec5e6e5758335315bc9e366504db49901fea01b4f6cec25",
        paper="Porian et al. 2024, Resolving Discrepancies in Compute-Optimal Scaling of Language Models (arXiv:2406.19146)",
        origin="github.com/formll/resolving-scaling-law-discrepancies @ 0dc60d91b8a525858a3067fc9e4a46ff5374cc6f, "
               "data/summary_df*.pickle.xz (loaded with a whitelist-restricted unpickler)",
        made="one row per (configuration, budget, model size): the loss at that IsoFLOP budget, best over "
             "hyperparameters, log-log interpolated from the loss curve",
        rows=1745, columns="dataset, hparams, warmup, decay, param_count, val, config_label, source_pickle, flops, "
                           "n_params, t_tokens, loss"),
    "porian2024_fits": Table(
        file="porian2024_fits.json", sha256="b13cbb7614bb6845bc3c102eb09345dda878b25a1df07b8f0247e96ce55bc1d7",
        paper="Porian et al. 2024 (arXiv:2406.19146)",
        origin="github.com/formll/resolving-scaling-law-discrepancies @ 0dc60d91b8a525858a3067fc9e4a46ff5374cc6f",
        made="the authors' fit results per configuration (basic, weighted, bs_median, bs_median_weighted; "
             "n_exponent = a in N* ~ C^a) with 95% bootstrap intervals; the A, E, alpha entries of the "
             "weighted dicts are stuck at their initial values and should be ignored",
        rows=15, columns="dataset, hparams, warmup, decay, param_count, val, config_label, basic, weighted, ..."),
    "muennighoff2023": Table(
        file="muennighoff2023.csv", sha256="f095a2096a938dab98746c71260c94dcae8183f7ae45278bba9f49426d853354",
        paper="Muennighoff et al. 2023, Scaling Data-Constrained Language Models (arXiv:2305.16264)",
        origin="github.com/huggingface/datablations @ 13701315b163f1c54642b94ad237b2699187c3ee, "
               "utils/parametric_fit.ipynb cell 26 output",
        made="the 182 samples of the final fit (outliers removed), read from the printed notebook output",
        rows=182, columns="run_name, N_params, D_tokens_total, U_unique_tokens, epochs_D_over_U, C_flop_6ND, val_loss"),
    "llama3_isoflops": Table(
        file="llama3_isoflops.csv", sha256="9450f8829778ce8bfb51cc9b18ef121ef18f0c81758cd8fbe74d9dcf0545a692",
        paper="Llama 3 herd of models, Fig. 2 (arXiv:2407.21783), digitised by eric-czech/llama3_isoflop_extraction",
        origin="github.com/Open-Athena/scaling-law-analysis @ bb2a20e570ab5ba71c9659da429baf4cbb09f03b, "
               "data/isoflops/extract/llama_3/isoflops.csv",
        made="133 points x 2 conditions (raw_loss = validation NLL; exp_loss = its exp); params = budget / "
             "(6 tokens), so N is derived, not measured",
        rows=266, columns="source, provenance, dataset, model, condition, experiment, tokens, params, budget, loss"),
}


def names() -> list[str]:
    return sorted(TABLES)


def _table(name: str) -> Table:
    if name not in TABLES:
        raise UsageError(f"published: unknown table {name!r}; choose one of {', '.join(names())}")
    return TABLES[name]


def path(name: str) -> Path:
    """The shipped file of table ``name``."""
    return DATA / _table(name).file


def load(name: str):
    """Table ``name`` as a DataFrame (a ``.json`` table: its parsed content)."""
    import pandas as pd

    p = path(name)
    if p.suffix == ".json":
        return json.loads(p.read_text())
    return pd.read_csv(p)


def provenance(name: str) -> dict:
    """Where table ``name`` comes from: paper, origin, how it was made, rows, columns, licence,
    the sha256 recorded when the file was copied in and (``sha256_now``) that of the file now."""
    t = _table(name)
    return {**asdict(t), "name": name, "sha256_now": hashlib.sha256(path(name).read_bytes()).hexdigest()}
