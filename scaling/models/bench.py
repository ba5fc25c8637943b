"""Sparse-model step time against the dense model: ``scaling bench moe`` / ``scaling bench mod``.

Both time the jitted training step that ``scaling train`` runs (``scaling.train.step``: forward,
backward, AdamW) on random tokens, single device, in one process, and report ratios:

* ``moe``: an MoE model (default 8 experts, top-2, capacity factor 1.25, every block) against
  the dense model with the same *active* parameters, i.e. the same shape with
  ``d_ff = (k_routed + n_shared) * expert_d_ff``. Each router given by ``--routers`` is timed
  (``dropless`` with each backend given by ``--backends``), so the fastest grouped matmul for
  this machine can be read off. Target on CPU: capacity mode <= 1.6x dense.
* ``mod``: mixture-of-depths (default capacity 12.5% on every other block) against the same
  dense model. Target on CPU: <= 0.75x dense.

Steps of the compared models are interleaved (A B A B ...) and the median of each is taken, so
a machine whose load changes during the run biases both sides alike.
"""

from __future__ import annotations

import dataclasses
import time

DEFAULTS = {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 256, "batch_size": 16, "vocab_size": 256}


def add_arguments(parser, kind: str) -> None:
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model after compilation (default 8)")
    parser.add_argument("--d-model", type=int, default=DEFAULTS["d_model"])
    parser.add_argument("--n-layers", type=int, default=DEFAULTS["n_layers"])
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    if kind == "moe":
        parser.add_argument("--n-experts", type=int, default=8)
        parser.add_argument("--top-k", type=int, default=2)
        parser.add_argument("--capacity-factor", type=float, default=1.25)
        parser.add_argument("--granularity", type=int, default=1)
        parser.add_argument("--routers", default="token_choice,dropless",
                            help="comma-separated routers to time (token_choice, dropless, expert_choice)")
        parser.add_argument("--backends", default="auto",
                            help="comma-separated grouped-matmul backends for dropless (auto, einsum, ragged_dot)")
    else:
        parser.add_argument("--capacity", type=float, default=0.125)
        parser.add_argument("--every", type=int, default=2)
    parser.set_defaults(bench_kind=kind)


def _base(args):
    from scaling.config import TrainConfig

    return TrainConfig().with_overrides({
        "model.d_model": args.d_model, "model.n_layers": args.n_layers, "model.n_heads": DEFAULTS["n_heads"],
        "model.vocab_size": DEFAULTS["vocab_size"], "data.seq_len": args.seq_len, "data.batch_size": args.batch_size,
    })


def _variants(args) -> tuple[object, dict[str, object]]:
    """(dense baseline TrainConfig, {name: sparse TrainConfig})."""
    from scaling.config import MoDConfig, MoEConfig

    base = _base(args)
    if args.bench_kind == "mod":
        mod = MoDConfig(capacity=args.capacity, every=args.every)
        return base, {f"mod_c{args.capacity:g}_every{args.every}": dataclasses.replace(base, model=dataclasses.replace(base.model, mod=mod))}
    variants = {}
    for router in [r.strip() for r in args.routers.split(",") if r.strip()]:
        backends = [b.strip() for b in args.backends.split(",")] if router == "dropless" else ["auto"]
        for backend in backends:
            moe = MoEConfig(n_experts=args.n_experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                            granularity=args.granularity, router=router, backend=backend)
            name = router if router != "dropless" else f"dropless_{backend}"
            variants[name] = dataclasses.replace(base, model=dataclasses.replace(base.model, moe=moe))
    first = next(iter(variants.values())).model
    dense_ff = (first.moe.k_routed + first.moe.n_shared_experts) * first.expert_d_ff
    dense = dataclasses.replace(base, model=dataclasses.replace(base.model, d_ff=dense_ff))
    return dense, variants


def measure(args) -> dict:
    import jax
    import numpy as np

    from scaling import flops, sharding
    from scaling.config import MeshConfig
    from scaling.train.timing import prepare_train_step  # the trainer's own step, state and sharding
    from scaling.train.metrics import hardware_flops_per_token

    dense, variants = _variants(args)
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    cfgs = {"dense": dense, **variants}
    prepared = {name: prepare_train_step(cfg, mesh) for name, cfg in cfgs.items()}
    states = {name: p[1] for name, p in prepared.items()}
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(args.steps):
        for name, (compiled, _, batch, _) in prepared.items():
            t = time.perf_counter()
            states[name], m = compiled(states[name], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
    L = dense.data.seq_len
    out = {"backend": jax.default_backend(), "kind": args.bench_kind,
           "shape": {"d_model": args.d_model, "n_layers": args.n_layers, "seq_len": L, "batch_size": args.batch_size},
           "models": {}}
    dense_s = float(np.median(times["dense"]))
    for name, cfg in cfgs.items():
        counts = flops.param_counts(cfg.model)
        step_s = float(np.median(times[name]))
        out["models"][name] = {
            "step_s": step_s, "compile_s": prepared[name][3], "ratio_to_dense": step_s / dense_s,
            "params_total": counts.total, "params_active": counts.active,
            "train_flops_per_token": flops.train_flops_per_token(cfg.model, L),
            "flops_ratio_to_dense": flops.train_flops_per_token(cfg.model, L) / flops.train_flops_per_token(dense.model, L),
            # what this backend computes (XLA's full attention square, the einsum experts'
            # padded slots): the ratio a step time can be held to
            "hardware_flops_ratio_to_dense": hardware_flops_per_token(cfg.model, L) / hardware_flops_per_token(dense.model, L),
        }
    return out


def report(out: dict) -> None:
    """Print ``measure``'s figures as a table (``--json`` prints the dict instead)."""
    s = out["shape"]
    target = "MoE capacity mode <= 1.6x dense" if out["kind"] == "moe" else "MoD <= 0.75x dense"
    print(f"backend {out['backend']}; d{s['d_model']} L{s['n_layers']} seq {s['seq_len']} batch {s['batch_size']}; "
          f"target (CPU): {target}")
    print(f"{'model':<24}{'params':>12}{'active':>12}{'step ms':>10}{'x dense':>9}{'FLOPs x':>9}{'HW FLOPs x':>11}"
          f"{'compile s':>11}")
    for name, m in out["models"].items():
        print(f"{name:<24}{m['params_total']:>12,}{m['params_active']:>12,}{m['step_s'] * 1e3:>10.1f}"
              f"{m['ratio_to_dense']:>9.2f}{m['flops_ratio_to_dense']:>9.2f}"
              f"{m.get('hardware_flops_ratio_to_dense', float('nan')):>11.2f}{m['compile_s']:>11.1f}")
