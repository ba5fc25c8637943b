"""Training throughput: matmul peak, tokens/s, achieved FLOP/s, MFU, compile s, peak memory.

``scaling bench train [--json] [--mesh data=8] [--steps N]`` measures, in one process, the
float32 matmul peak of the default device and the jitted train step (``scaling.train.step``,
the one ``scaling train`` runs) of the reference model: dense,
d_model 256, 4 layers, 4 heads, seq 256, batch 16, vocab 256, float32. FLOPs per token come from
``scaling.flops.train_flops_per_token`` (exact count), so MFU = tokens/s x FLOPs/token / peak. ``step_s`` is a step without the
noise-scale statistics; ``gns_overhead`` gives the step time with them on every step
(``optim.gns_every=1``) and on every 10th (``10``) relative to it, all measured in this process.

With ``--mesh``, the same step is also timed with the batch and parameters sharded over that
mesh and reported as ``sharded_step_s / single_step_s``. On CPU, a mesh larger than the device
count is made of host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), which
this module sets itself when jax has not started yet.
"""

from __future__ import annotations

import math
import os
import resource
import sys

REFERENCE = {"d_model": 256, "n_layers": 4, "n_heads": 4, "seq_len": 256, "batch_size": 16, "vocab_size": 256}


def add_arguments(parser, kind: str = "train") -> None:
    parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                        help="also time the step sharded over this mesh, e.g. data=8")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after compilation (default 8)")
    parser.add_argument("--d-model", type=int, default=REFERENCE["d_model"])
    parser.add_argument("--n-layers", type=int, default=REFERENCE["n_layers"])
    parser.add_argument("--seq-len", type=int, default=REFERENCE["seq_len"])
    parser.add_argument("--batch-size", type=int, default=REFERENCE["batch_size"])


def _ensure_devices(n: int) -> None:
    """Ask XLA for ``n`` host devices if jax has not initialised its backends yet."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def measure(args) -> dict:
    mesh_cfg = None
    if args.mesh:
        from scaling.sharding import parse_mesh

        mesh_cfg = parse_mesh(args.mesh)
        want = math.prod(v for v in mesh_cfg.as_dict().values() if v > 0)
        _ensure_devices(max(want, 1))

    import jax

    from scaling import flops, sharding
    from scaling.config import MeshConfig, TrainConfig
    from scaling.train.metrics import measure_matmul_flops
    from scaling.train.timing import time_train_step

    cfg = TrainConfig().with_overrides({
        "model.d_model": args.d_model, "model.n_layers": args.n_layers, "model.n_heads": REFERENCE["n_heads"],
        "model.vocab_size": REFERENCE["vocab_size"], "data.seq_len": args.seq_len, "data.batch_size": args.batch_size,
    })
    # peak before and after the step timing, best kept: on a shared machine either can be
    # disturbed, and a too-low peak would inflate the MFU
    peak = measure_matmul_flops()
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    single = time_train_step(cfg, one, steps=args.steps)
    with_stats = {n: time_train_step(cfg, one, steps=args.steps, gns_every=n)["step_s"] for n in (1, 10)}
    peak = max(peak, measure_matmul_flops())
    fpt = float(flops.train_flops_per_token(cfg.model, cfg.data.seq_len))
    tok_s = cfg.tokens_per_step / single["step_s"]
    out = {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "model": {**REFERENCE, "d_model": args.d_model, "n_layers": args.n_layers, "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "params": flops.param_counts(cfg.model).total},
        "matmul_peak_flops": peak,
        "train_flops_per_token": fpt,
        "step_s": single["step_s"],
        "compile_s": single["compile_s"],
        "tokens_per_s": tok_s,
        "achieved_flops": tok_s * fpt,
        "mfu": tok_s * fpt / peak,
        "peak_rss_bytes": _peak_rss_bytes(),
        "gns_overhead": {f"every_{n}": t / single["step_s"] - 1 for n, t in with_stats.items()},
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    if mesh_cfg is not None:
        mesh = sharding.make_mesh(mesh_cfg)
        sharding.validate(cfg.model, cfg.data, mesh)
        sharded = time_train_step(cfg, mesh, steps=args.steps)
        out["mesh"] = dict(mesh.shape)
        out["sharded_step_s"] = sharded["step_s"]
        out["sharded_compile_s"] = sharded["compile_s"]
        out["sharded_over_single"] = sharded["step_s"] / single["step_s"]
        out["sharded_loss_abs_diff"] = abs(sharded["final_loss"] - single["final_loss"])
    return out


def report(out: dict) -> None:
    """Print ``measure``'s figures as a table (``--json`` prints the dict instead)."""
    m = out["model"]
    print(f"backend {out['backend']} ({out['device_kind']}, {out['cpu_count']} cores)")
    print(f"float32 matmul peak      {out['matmul_peak_flops'] / 1e9:8.1f} GFLOP/s")
    print(f"model d{m['d_model']} L{m['n_layers']} seq {m['seq_len']} batch {m['batch_size']} "
          f"vocab {m['vocab_size']} ({m['params']:,} params)")
    print(f"compile                  {out['compile_s']:8.2f} s")
    print(f"step                     {out['step_s'] * 1e3:8.1f} ms")
    print(f"throughput               {out['tokens_per_s']:8.0f} tokens/s")
    print(f"achieved                 {out['achieved_flops'] / 1e9:8.1f} GFLOP/s")
    print(f"MFU                      {100 * out['mfu']:8.1f} %")
    print(f"peak RSS                 {out['peak_rss_bytes'] / 2**20:8.0f} MiB")
    for k, v in out["gns_overhead"].items():
        print(f"noise-scale statistics {k.replace('_', ' ')} step(s): {100 * v:+.1f} % step time")
    if "mesh" in out:
        print(f"sharded step on {out['mesh']}: {out['sharded_step_s'] * 1e3:.1f} ms "
              f"({out['sharded_over_single']:.2f}x single device)")
