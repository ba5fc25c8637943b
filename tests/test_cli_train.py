"""`scaling train` input errors: each bad input gives one line naming the field, exit status 2,
no traceback, and nothing is trained."""

import json

import pytest

from scaling.cli import main
from scaling.config import TrainConfig

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "data.seq_len=16", "--set", "data.batch_size=16", "--no-progress"]


def _bad_config_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"model": {"d_model": 32,')
    return ["--config", str(p)]


def _other_run_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    other = TrainConfig().with_overrides(["model.d_model=48"])
    (out / "config.json").write_text(other.to_json())
    return ["--out", str(out)]


def _file_as_parent(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return ["--out", str(f / "run")]


CASES = {
    "negative size": (["--set", "model.d_model=-8"], "model.d_model"),
    "heads do not divide d_model": (["--set", "model.n_heads=3"], "model.n_heads"),
    "unknown field": (["--set", "model.widht=64"], "model.widht"),
    "unknown section field": (["--set", "optimizer.lr=1"], "optimizer"),
    "unknown experiment": (["--experiment", "no_such_family"], "experiment"),
    "malformed --set": (["--set", "model.d_model"], "--set"),
    "bad type": (["--set", "model.d_model=wide"], "model.d_model"),
    "float for int": (["--set", "budget.steps=1.5"], "budget.steps"),
    "budget below one step": (["--set", "budget.flops=1000"], "budget.flops"),
    "missing local_text dir": (["--set", "data.source=local_text", "--set", "data.path=/no/such/dir"], "data.path"),
    "bad schedule": (["--set", "optim.schedule=exponential"], "optim.schedule"),
    "lr zero": (["--set", "optim.lr=0"], "optim.lr"),
    "lr negative": (["--set", "optim.lr=-1e-3"], "optim.lr"),
    "seq_len 0": (["--set", "data.seq_len=0"], "data.seq_len"),
    "batch not divisible by mesh": (["--set", "data.batch_size=12"], "data.batch_size"),
    "odd batch": (["--set", "data.batch_size=7"], "data.batch_size"),
    "mesh does not divide devices": (["--set", "mesh.data=3"], "mesh.data"),
    "log_every 0": (["--set", "log_every=0"], "log_every"),
    "bad init_from": (["--set", "init_from=somewhere"], "init_from"),
    "bad --config JSON": (_bad_config_file, "--config"),
    "missing --config file": (["--config", "/no/such/config.json"], "--config"),
    "unwritable out dir": (_file_as_parent, "out"),
    "out dir holds another run": (_other_run_dir, "out"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    extra, field = CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    out = [] if "--out" in extra else ["--out", str(tmp_path / "run")]
    rc = main(["train", *TINY, *extra, *out])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("scaling train: error:")]
    assert len(lines) == 1, err
    assert field in lines[0], lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "ckpt").exists()


def test_config_file_then_overrides_layering(tmp_path):
    """--config sets fields over the experiment; --set wins over --config."""
    import argparse

    from scaling.train.cli import build_config

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"d_model": 48, "n_heads": 4}, "budget": {"tokens": 12345}, "seed": 7}))
    args = argparse.Namespace(config=str(p), experiment=None, overrides=["model.d_model=96"], wandb="offline",
                              no_progress=True)
    cfg = build_config(args)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.seed) == (96, 4, 7)
    assert cfg.budget.kind == "tokens" and cfg.budget.tokens == 12345
    assert cfg.wandb == "offline" and cfg.progress is False
