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
    # the scanned program does not grow with depth (op counts, never wall-clock); remat cuts
    # what the backward pass keeps
    prog = out["program"]
    assert set(prog) == {"L4_loop", "L4_scan", "L24_loop", "L24_scan"}
    assert prog["L24_scan"]["hlo_ops"] <= 1.2 * prog["L4_scan"]["hlo_ops"]
    assert prog["L24_loop"]["hlo_ops"] > 3 * prog["L4_loop"]["hlo_ops"]
    rb = out["remat_saved_bytes"]
    assert rb["none"] >= 2 * rb["full"] and rb["none"] > rb["dots_saveable"] > rb["full"]
    tb = out["remat_temp_bytes"]  # XLA's own compiled temp bytes, scanned blocks (the check)
    assert tb["none"] >= 2 * tb["full"] and tb["none"] > tb["dots_saveable"] > tb["full"]


def test_accelerator_presets_are_sized_and_refused_on_cpu(capsys):
    """``--preset gpu-1b`` is a ~1B dense model and ``gpu-moe`` a Mixtral-like MoE, both bf16,
    seq 2048, scanned, rematerialised, fused attention by backend; on a CPU the preset is one
    line, exit 2 (they are for an accelerator; MFU quotes come from runs there)."""
    from scaling import flops
    from scaling.train.bench import preset_config

    dense, moe = preset_config("gpu-1b"), preset_config("gpu-moe")
    assert 0.9e9 < flops.param_counts(dense.model).total < 1.1e9
    pc = flops.param_counts(moe.model)
    assert moe.model.moe.n_experts == 8 and moe.model.moe.top_k == 2 and pc.active < 0.4 * pc.total
    for c in (dense, moe):
        assert (c.model.dtype, c.data.seq_len, c.model.scan_layers, c.model.remat) == ("bfloat16", 2048, True, "full")
    assert main(["bench", "train", "--preset", "gpu-1b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preset gpu-1b" in err and "this backend is cpu" in err and len(err.splitlines()) == 1


def test_bench_stack_reports_the_speedup_of_stacked_trials(capsys):
    """`scaling bench stack`: K stacked trials against the same K trained one at a time, in one
    process on the same batches; the lanes' losses follow the solo runs (not bitwise)."""
    import json

    rc = main(["bench", "stack", "--json", "--trials", "2", "--steps", "3", "--n-layers", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trials"] == 2 and out["steps"] == 3 and out["speedup"] > 0
    assert out["max_abs_loss_diff"] < 1e-4  # two moderate learning rates, three steps
    assert main(["bench", "stack", "--trials", "0"]) == 2
