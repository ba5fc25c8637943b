"""`scaling bench train`: the JSON report, and the sharded step computing what the single-device
step computes."""

import json
import math

import pytest

from scaling.cli import main


@pytest.mark.slow
def test_bench_train_json_and_sharded_equivalence(capsys):
    rc = main(["bench", "train", "--json", "--mesh", "data=8", "--steps", "2", "--d-model", "32", "--n-layers", "1",
               "--seq-len", "32", "--batch-size", "16"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"]["data"] == 8
    # same model, same data, same number of steps: data parallelism changes only rounding
    assert out["sharded_loss_abs_diff"] < 1e-4
    # MFU is the achieved FLOP/s over the measured peak, FLOPs from scaling.flops
    assert out["achieved_flops"] == out["tokens_per_s"] * out["train_flops_per_token"]
    assert out["mfu"] == out["achieved_flops"] / out["matmul_peak_flops"]
    assert out["tokens_per_s"] == 16 * 32 / out["step_s"]
    assert 0 < out["mfu"] < 1.5 and out["peak_rss_bytes"] > 0
    assert set(out["gns_overhead"]) == {"every_1", "every_10"}  # ratios, measured in this process
    assert all(math.isfinite(v) and v > -1 for v in out["gns_overhead"].values())
