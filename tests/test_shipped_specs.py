"""Every shipped sweep spec trains: one or two steps of every kind of trial it makes (role,
variant, experiment, batch size, MoE/MoD settings) with its real shapes and data, so a spec is
never only ever checked with --plan (the batch-128 trial of batch_size.yaml used to fail on its
held-out set). The held-out set is cut to one chunk here to keep CI short; its size no longer
depends on the batch (tests/test_data.py checks the set itself)."""

import dataclasses
import json
import math

import pytest

from scaling.sweep import spec
from scaling.train import loop

SHIPPED = ["batch_size", "isoflop_cpu", "lr_grid", "lr_power_law", "mod_vs_dense", "moe_granularity", "quickstart"]


def kinds(trials):
    """The smallest trial of each kind, mains before branches; a chosen branch brings its own
    main run (the checkpoint it starts from has its shapes)."""
    out = {}
    for t in sorted(trials, key=lambda t: (t.role == "branch", t.planned_flops or 0.0)):
        m = t.config.model
        key = (t.role, t.describe().get("variant"), t.config.experiment, t.config.data.batch_size, repr(m.moe), repr(m.mod))
        out.setdefault(key, t)
    chosen = list(out.values())
    by_id = {t.id: t for t in trials}
    mains = [t for t in chosen if t.role != "branch"]
    for b in chosen:
        if b.role == "branch" and b.main in by_id and by_id[b.main] not in mains:
            mains.append(by_id[b.main])
    return mains + [t for t in chosen if t.role == "branch"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_trial_kind_of_every_shipped_spec_trains(name, tmp_path):
    chosen = kinds(spec.trials(spec.load(name)))
    mains = {}
    for i, t in enumerate(chosen):
        cfg = dataclasses.replace(t.config, progress=False, checkpoint_at=(1,), eval_every=1000)
        # the test process has 8 host devices: split what the batch cannot over the tensor axis;
        # where the heads cannot take it (batch_size.yaml's d48 model has 3 heads), the batch
        # grows to one row per device (the shape, the thing checked, stays as shipped)
        rows = math.gcd(cfg.data.batch_size, 8)
        if cfg.model.n_heads % (8 // rows) or cfg.model.resolved_n_kv_heads % (8 // rows):
            cfg, rows = cfg.with_overrides({"data.batch_size": 8}), 8
        cfg = cfg.with_overrides({"budget.steps": 2, "mesh.data": rows, "mesh.tensor": 8 // rows,
                                  "data.eval_tokens": 32 * cfg.data.seq_len})  # one held-out chunk
        if t.role == "branch":
            cfg = dataclasses.replace(cfg, init_from=f"{mains[t.main]}@1")  # its own main run
        out = tmp_path / f"{i}"
        summary = loop.run(cfg, out)
        assert summary["state"] == "done" and summary["steps"] == 2, (name, t.describe(), summary.get("error"))
        assert summary["final_eval_loss"] == summary["final_eval_loss"]  # finite
        if t.role != "branch":
            mains[t.id] = out
        ev = json.loads((out / "config.json").read_text())["resolved"]["eval_set"]
        assert ev["n_tokens"] == summary["eval_tokens"] > 0
