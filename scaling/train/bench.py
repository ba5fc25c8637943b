"""Training throughput: matmul peak, tokens/s, achieved FLOP/s, MFU, compile s, peak memory.

``scaling bench train [--json] [--mesh data=8] [--steps N]`` measures, in one process, the
float32 matmul peak of the default device and the jitted train step (``scaling.train.step``,
the one ``scaling train`` runs) of the reference model: dense,
d_model 256, 4 layers, 4 heads, seq 256, batch 16, vocab 256, float32. FLOPs per token come from
``scaling.flops.train_flops_per_token`` (model FLOPs, causal attention), so MFU = tokens/s x
FLOPs/token / peak; HFU uses ``hardware_train_flops_per_token`` (what the kernel and remat
compute: XLA's attention the full square). ``step_s`` is a step without the
noise-scale statistics; ``gns_overhead`` gives the step time with them on every step
(``optim.gns_every=1``) and on every 10th (``10``) relative to it, all measured in this process.
``program`` gives the lowered train step's size and compile seconds at 4 and 24 layers, blocks in
a loop and scanned (``model.scan_layers``); ``remat_saved_bytes`` what the backward pass keeps
per ``model.remat`` policy for a 12-layer d256 seq-1024 model, ``remat_temp_bytes`` XLA's
compiled temp bytes for it with scanned blocks.

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

# Accelerator presets (``--preset``): bf16, seq 2048, scanned and rematerialised blocks, the
# backend's fused attention. gpu-1b: a Llama-shaped dense model of ~0.96B parameters; gpu-moe:
# a small Mixtral-like model (8 experts, top-2, every block) of 0.81B total, 0.28B active.
PRESETS = {
    "gpu-1b": {"model.vocab_size": 32768, "model.d_model": 2048, "model.n_layers": 16, "model.n_heads": 16,
               "model.activation": "swiglu", "model.d_ff": 5632, "model.tie_embeddings": False,
               "model.dtype": "bfloat16", "model.scan_layers": True, "model.remat": "full",
               "model.attention": "auto", "data.seq_len": 2048, "data.batch_size": 8},
    "gpu-moe": {"model.vocab_size": 32768, "model.d_model": 1024, "model.n_layers": 8, "model.n_heads": 16,
                "model.activation": "swiglu", "model.d_ff": 3584, "model.tie_embeddings": False,
                "model.moe": "on", "model.moe.n_experts": 8, "model.moe.top_k": 2,
                "model.dtype": "bfloat16", "model.scan_layers": True, "model.remat": "full",
                "model.attention": "auto", "data.seq_len": 2048, "data.batch_size": 8},
}


def preset_config(name: str):
    """The ``TrainConfig`` of an accelerator preset (``PRESETS``)."""
    from scaling.config import TrainConfig
    from scaling.errors import UsageError

    if name not in PRESETS:
        raise UsageError(f"--preset: {name!r} is not a preset; choose {', '.join(PRESETS)}")
    return TrainConfig().with_overrides(dict(PRESETS[name]))


def add_arguments(parser, kind: str = "train") -> None:
    parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                        help="also time the step sharded over this mesh, e.g. data=8")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after compilation (default 8)")
    parser.add_argument("--d-model", type=int, default=REFERENCE["d_model"])
    parser.add_argument("--n-layers", type=int, default=REFERENCE["n_layers"])
    parser.add_argument("--seq-len", type=int, default=REFERENCE["seq_len"])
    parser.add_argument("--batch-size", type=int, default=REFERENCE["batch_size"])
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="an accelerator-sized model (bf16, seq 2048, scan + remat + fused attention); MFU "
                             "against the device's bf16 peak. Refused on CPU")


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


def measure_preset(name: str, steps: int) -> dict:
    """Step time, tokens/s and MFU of a preset on one accelerator, MFU against the vendor bf16
    peak of the device (``scaling.train.metrics.PEAK_TABLE``)."""
    import jax

    from scaling import flops, sharding
    from scaling.config import MeshConfig
    from scaling.errors import UsageError
    from scaling.models.layers import attention_implementation
    from scaling.train.metrics import hardware_flops_per_token
    from scaling.train.metrics import peak_flops
    from scaling.train.timing import time_train_step

    cfg = preset_config(name)
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        raise UsageError(f"--preset {name}: sized for an accelerator ({flops.param_counts(cfg.model).total / 1e9:.2f}B "
                         f"parameters at seq {cfg.data.seq_len}); this backend is {backend}. Run it on a GPU/TPU, or "
                         "size a model with --d-model/--n-layers")
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    t = time_train_step(cfg, one, steps=steps)
    fpt = float(flops.train_flops_per_token(cfg.model, cfg.data.seq_len))
    kernel = attention_implementation(cfg.model, seq_len=cfg.data.seq_len)
    hw = hardware_flops_per_token(cfg.model, cfg.data.seq_len)
    tok_s = cfg.tokens_per_step / t["step_s"]
    peak = peak_flops(1)
    return {"preset": name, "backend": backend, "device_kind": jax.devices()[0].device_kind,
            "params": flops.param_counts(cfg.model).total, "active_params": flops.param_counts(cfg.model).active,
            "attention": kernel, "config": PRESETS[name],
            "step_s": t["step_s"], "compile_s": t["compile_s"], "tokens_per_s": tok_s, "train_flops_per_token": fpt,
            "hardware_flops_per_token": hw, "achieved_flops": tok_s * fpt, "bf16_peak_flops": peak,
            "mfu": tok_s * fpt / peak, "hfu": tok_s * hw / peak,
            "final_loss": t["final_loss"]}


def measure(args) -> dict:
    if getattr(args, "preset", None):
        from scaling.errors import UsageError

        sized = {"--mesh": args.mesh is not None, "--d-model": args.d_model != REFERENCE["d_model"],
                 "--n-layers": args.n_layers != REFERENCE["n_layers"], "--seq-len": args.seq_len != REFERENCE["seq_len"],
                 "--batch-size": args.batch_size != REFERENCE["batch_size"]}
        clash = [k for k, v in sized.items() if v]
        if clash:
            raise UsageError(f"--preset {args.preset}: fixes the model, batch and device; drop {', '.join(clash)}")
        return measure_preset(args.preset, args.steps)
    mesh_cfg = None
    if args.mesh:
        from scaling.sharding import parse_mesh

        mesh_cfg = parse_mesh(args.mesh)
        want = math.prod(v for v in mesh_cfg.as_dict().values() if v > 0)
        _ensure_devices(max(want, 1))

    import jax

    from scaling import flops, sharding
    from scaling.config import MeshConfig, TrainConfig
    from scaling.train.metrics import hardware_flops_per_token
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
    hw = hardware_flops_per_token(cfg.model, cfg.data.seq_len)
    from scaling.models.layers import attention_implementation

    kernel = attention_implementation(cfg.model, seq_len=cfg.data.seq_len)
    tok_s = cfg.tokens_per_step / single["step_s"]
    out = {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "model": {**REFERENCE, "d_model": args.d_model, "n_layers": args.n_layers, "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "params": flops.param_counts(cfg.model).total},
        "matmul_peak_flops": peak,
        "train_flops_per_token": fpt,
        "hardware_flops_per_token": hw,
        "attention": kernel,
        "step_s": single["step_s"],
        "compile_s": single["compile_s"],
        "tokens_per_s": tok_s,
        "achieved_flops": tok_s * fpt,
        "mfu": tok_s * fpt / peak,
        "hfu": tok_s * hw / peak,
        "peak_rss_bytes": _peak_rss_bytes(),
        "gns_overhead": {f"every_{n}": t / single["step_s"] - 1 for n, t in with_stats.items()},
    }
    out["program"] = program_sizes()
    out["remat_saved_bytes"] = remat_residuals()
    out["remat_temp_bytes"] = remat_temp_bytes()
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


def program_sizes(depths=(4, 24), d_model: int = 64, seq_len: int = 32, batch: int = 4) -> dict:
    """Operations in the lowered train step (StableHLO lines) and seconds to lower + compile it
    at each depth, with the blocks in a Python loop and with ``model.scan_layers``: a scanned
    program does not grow with depth. Small shapes: the figures are about the program."""
    import time

    import jax.numpy as jnp
    from flax import nnx

    from scaling.config import TrainConfig
    from scaling.models.transformer import Transformer
    from scaling.train import optim
    from scaling.train import step as step_lib

    out = {}
    for n in depths:
        for layout in ("loop", "scan"):
            cfg = TrainConfig().with_overrides({"model.d_model": d_model, "model.n_layers": n, "model.n_heads": 2,
                                                "model.scan_layers": layout == "scan", "data.seq_len": seq_len,
                                                "data.batch_size": batch})
            graphdef, params, rest = step_lib.split_model(Transformer(cfg.model, rngs=nnx.Rngs(0)))
            state = step_lib.init_state(params, rest, optim.make_optimizer(cfg.optim, model_cfg=cfg.model))
            fn = step_lib.make_traced_train_step(graphdef, cfg.optim, cfg.model, gns_every=0)
            zeros = jnp.zeros((batch, seq_len), jnp.int32)
            t = time.perf_counter()
            lowered = fn.lower(state, {"inputs": zeros, "targets": zeros})
            ops = sum(1 for line in lowered.as_text().splitlines() if " = " in line)
            lowered.compile()
            out[f"L{n}_{layout}"] = {"hlo_ops": ops, "compile_s": time.perf_counter() - t}
    return out


def remat_residuals(d_model: int = 256, n_layers: int = 12, seq_len: int = 1024, batch: int = 2) -> dict:
    """Bytes the backward pass keeps from the forward (``scaling.models.remat``) per
    ``model.remat`` policy, for the issue's 12-layer d256 seq-1024 model (traced, not run)."""
    from scaling.models.remat import saved_residual_bytes

    out = {}
    for policy in ("none", "full", "dots_saveable"):
        out[policy] = saved_residual_bytes(*_remat_loss(policy, d_model, n_layers, seq_len, batch, scan=False))
    return out


def remat_temp_bytes(d_model: int = 256, n_layers: int = 12, seq_len: int = 1024, batch: int = 2) -> dict:
    """XLA's ``memory_analysis()`` temp bytes of the compiled gradient of the same model with
    scanned blocks, per ``model.remat`` policy (compiled, not run). The scanned layout is the
    one the compiler can schedule: with a Python loop of blocks XLA's CPU scheduler reports the
    same temp bytes whatever the policy (measured: 1,700 MiB for none, full and dots_saveable)."""
    import jax

    out = {}
    for policy in ("none", "full", "dots_saveable"):
        loss, params = _remat_loss(policy, d_model, n_layers, seq_len, batch, scan=True)
        out[policy] = int(jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes)
    return out


def _remat_loss(policy: str, d_model: int, n_layers: int, seq_len: int, batch: int, *, scan: bool):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from scaling.config import ModelConfig
    from scaling.models.transformer import Transformer
    from scaling.train import step as step_lib

    toks = jnp.zeros((batch, seq_len), jnp.int32)
    m = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=4, remat=policy, scan_layers=scan)
    graphdef, params, rest = step_lib.split_model(Transformer(m, rngs=nnx.Rngs(0)))

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(toks)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return loss, params


def report(out: dict) -> None:
    """Print ``measure``'s figures as a table (``--json`` prints the dict instead)."""
    if "preset" in out:
        print(f"preset {out['preset']} on {out['backend']} ({out['device_kind']}): {out['params'] / 1e9:.2f}B params "
              f"({out['active_params'] / 1e9:.2f}B active), attention {out['attention']}")
        print(f"compile {out['compile_s']:.1f} s, step {out['step_s'] * 1e3:.1f} ms, {out['tokens_per_s']:.0f} tokens/s, "
              f"{out['achieved_flops'] / 1e12:.1f} TFLOP/s, MFU {100 * out['mfu']:.1f} % of the bf16 peak "
              f"{out['bf16_peak_flops'] / 1e12:.0f} TFLOP/s (HFU {100 * out['hfu']:.1f} %: {out['attention']} "
              f"attention, remat {out['config'].get('model.remat', 'none')})")
        return
    m = out["model"]
    print(f"backend {out['backend']} ({out['device_kind']}, {out['cpu_count']} cores)")
    print(f"float32 matmul peak      {out['matmul_peak_flops'] / 1e9:8.1f} GFLOP/s")
    print(f"model d{m['d_model']} L{m['n_layers']} seq {m['seq_len']} batch {m['batch_size']} "
          f"vocab {m['vocab_size']} ({m['params']:,} params)")
    print(f"compile                  {out['compile_s']:8.2f} s")
    print(f"step                     {out['step_s'] * 1e3:8.1f} ms")
    print(f"throughput               {out['tokens_per_s']:8.0f} tokens/s")
    print(f"achieved                 {out['achieved_flops'] / 1e9:8.1f} GFLOP/s")
    print(f"MFU                      {100 * out['mfu']:8.1f} %  (model FLOPs: causal attention)")
    print(f"HFU                      {100 * out['hfu']:8.1f} %  (hardware FLOPs: {out.get('attention', 'xla')} "
          "attention as computed)")
    print(f"peak RSS                 {out['peak_rss_bytes'] / 2**20:8.0f} MiB")
    for k, v in out["gns_overhead"].items():
        print(f"noise-scale statistics {k.replace('_', ' ')} step(s): {100 * v:+.1f} % step time")
    for k, v in out.get("program", {}).items():
        print(f"program {k:<9} {v['hlo_ops']:6d} HLO ops, lowered + compiled in {v['compile_s']:.2f} s")
    rb = out.get("remat_saved_bytes", {})
    if rb:
        print("saved for backward (d256 L12 seq 1024 batch 2): "
              + ", ".join(f"remat {k} {v / 2**20:.0f} MiB" for k, v in rb.items()))
    tb = out.get("remat_temp_bytes", {})
    if tb:
        print("XLA temp bytes, scanned (d256 L12 seq 1024 batch 2): "
              + ", ".join(f"remat {k} {v / 2**20:.0f} MiB" for k, v in tb.items()))
    if "mesh" in out:
        print(f"sharded step on {out['mesh']}: {out['sharded_step_s'] * 1e3:.1f} ms "
              f"({out['sharded_over_single']:.2f}x single device)")
