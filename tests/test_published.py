"""The published tables shipped with the package (scaling.published)."""

import hashlib

import pytest

from scaling import published
from scaling.errors import UsageError

SHARED = {"chinchilla_epoch": "chinchilla_epoch_245runs_N_D_C_loss.csv", "porian2024_isoflop": "porian2024_isoflop_points.csv",
          "porian2024_fits": "porian2024_fit_results.json", "muennighoff2023": "muennighoff2023_datablations_182runs_N_D_U_loss.csv",
          "llama3_isoflops": "llama3_isoflops_digitized.csv"}


def test_every_table_loads_with_its_stated_rows_and_provenance():
    assert set(SHARED) | {"chinchilla_epoch_fits"} == set(published.names())
    for name in published.names():
        t = published.load(name)
        p = published.provenance(name)
        assert len(t) == p["rows"], name
        assert p["paper"] and p["origin"] and "@" in p["origin"] and p["licence"] and len(p["sha256"]) == 64
        assert p["sha256_now"] == p["sha256"], name  # the shipped file is the one recorded
    d = published.load("chinchilla_epoch")
    assert int((d["epoch_outlier_excluded"] == 0).sum()) == 240
    with pytest.raises(UsageError, match="unknown table 'nope'"):
        published.load("nope")


def test_shipped_copies_are_byte_identical_to_the_collected_files(validation_dir):
    for name, f in SHARED.items():
        assert hashlib.sha256((validation_dir / f).read_bytes()).hexdigest() == published.provenance(name)["sha256"], name
