"""Test setup: 8 host CPU devices for sharding tests, wandb forced off, shared data paths."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VALIDATION = Path(os.environ.get("SCALING_VALIDATION_DIR", REPO.parent / "shared" / "validation"))


@pytest.fixture
def validation_dir() -> Path:
    """Shared published-run data (../shared/validation); skip when absent."""
    if not VALIDATION.is_dir():
        pytest.skip(f"shared validation data not found at {VALIDATION} (set SCALING_VALIDATION_DIR)")
    return VALIDATION


def assert_refused(sets: list[str], message: str, tmp_path: Path, capsys) -> None:
    """``--set`` overrides that the config refuses with ``message``: the same ConfigError from
    ``TrainConfig.with_overrides`` and one line on stderr with exit 2 from ``scaling train``,
    which then writes no metrics."""
    import re

    from scaling.cli import main
    from scaling.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        TrainConfig().with_overrides(sets)
    args = ["train", "--out", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"scaling train: error: {message}"]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
