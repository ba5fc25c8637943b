"""``scaling coord-check``: the μP paper's coordinate check (Yang et al. 2022, §D / Figure 5).

Train one dense model per width for a few Adam steps at a fixed learning rate and measure, on a
fixed batch, the mean absolute change of every layer's output since initialisation,
``mean |h_t - h_0|`` over batch, positions and coordinates. Under μP those sizes stay the same
as the width grows (each layer learns features at a width-independent rate); under SP they grow
with width (the update of a width-``D`` matrix moves its outputs ``∝ D``), which is why SP's
best learning rate shifts with size.

Layers: ``embed`` (token embedding output), ``l{i}/attn`` and ``l{i}/mlp`` (each block's
attention and MLP branch outputs before the residual add) and ``logits`` (the readout, with
μP's multiplier). Widths share depth, heads and everything else; μP's base width is the first
width unless given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scaling.config import ConfigError, DataConfig, ModelConfig, OptimConfig


def layer_outputs(model, tokens_BxL) -> dict:
    """``{layer: float32 array}`` of a dense ``Transformer``'s intermediate outputs (see module)."""
    import jax.numpy as jnp

    out = {}
    x = model.embed(tokens_BxL)
    out["embed"] = x
    B, L = tokens_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    for i, block in enumerate(model.blocks):
        a = block.attn(block.attn_norm(x), positions)
        out[f"l{i}/attn"] = a
        x = x + a
        y, _ = block.mlp(block.mlp_norm(x), train=True)
        out[f"l{i}/mlp"] = y
        x = x + y
    logits, _ = model(tokens_BxL, train=True)
    out["logits"] = logits
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def model_at(width: int, *, parametrization: str, base_width: int, n_layers: int = 2, n_heads: int = 4,
             vocab_size: int = 256) -> ModelConfig:
    """The coordinate check's model at ``width`` (heads fixed, so the head dimension grows)."""
    return ModelConfig(vocab_size=vocab_size, d_model=width, n_layers=n_layers, n_heads=n_heads,
                       parametrization=parametrization, mup_base_width=base_width if parametrization == "mup" else None)


def coord_check(widths, *, parametrization: str, lr: float = 1e-2, steps: int = 5, base_width: int | None = None,
                n_layers: int = 2, n_heads: int = 4, batch_size: int = 8, seq_len: int = 64, seed: int = 0,
                data: DataConfig | None = None) -> dict:
    """``{"widths": [...], "layers": {layer: [[mean |h_t - h_0| for t = 1..steps] per width]}}``.

    Adam (``scaling.train.optim``, the trainer's own optimizer and μP multipliers) at a constant
    ``lr`` without warmup, ``steps`` updates on batches of the training stream; every
    measurement is on the first batch. Sizes are in the activations' own units (nats for
    logits)."""
    import jax
    from flax import nnx

    from scaling.data import loader
    from scaling.models.transformer import Transformer
    from scaling.train import optim, step as step_lib

    widths = [int(w) for w in widths]
    if not widths or any(w < 1 for w in widths):
        raise ConfigError(f"--widths: give positive widths, got {widths}")
    base = base_width if base_width is not None else widths[0]
    data = data or DataConfig(source="stdlib", seq_len=seq_len, batch_size=batch_size, eval_tokens=seq_len)
    ocfg = OptimConfig(lr=lr, schedule="constant", warmup_steps=0)
    it = loader.make_train_iterator(data, seed=seed)
    batches = [next(it) for _ in range(steps)]
    probe = jax.numpy.asarray(batches[0]["inputs"])
    layers: dict[str, list] = {}
    for w in widths:
        cfg = model_at(w, parametrization=parametrization, base_width=base, n_layers=n_layers, n_heads=n_heads,
                       vocab_size=max(256, data.synthetic_vocab if data.source == "synthetic" else 256))
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
        graphdef, params, rest = step_lib.split_model(model)
        outputs = jax.jit(lambda p, r: layer_outputs(nnx.merge(graphdef, p, r), probe))
        h0 = outputs(params, rest)
        tx = optim.make_optimizer(ocfg, model_cfg=cfg)
        state = step_lib.init_state(params, rest, tx, total_steps=steps)
        train = step_lib.make_traced_train_step(graphdef, ocfg, cfg, donate=False)
        series: dict[str, list] = {k: [] for k in h0}
        for b in batches:
            state, _ = train(state, {k: jax.numpy.asarray(v) for k, v in b.items()})
            ht = outputs(state["params"], state["rest"])
            for k in h0:
                series[k].append(float(jax.numpy.mean(jax.numpy.abs(ht[k] - h0[k]))))
        for k, v in series.items():
            layers.setdefault(k, []).append(v)
    return {"widths": widths, "parametrization": parametrization, "base_width": base, "lr": lr, "steps": steps,
            "n_layers": n_layers, "n_heads": n_heads, "batch_size": data.batch_size, "seq_len": data.seq_len,
            "layers": layers}


def spread(result: dict, step: int | None = None) -> dict:
    """Per layer, ``max / min`` over widths of the change at ``step`` (default: the last)."""
    t = (step or result["steps"]) - 1
    return {k: float(max(v[t] for v in per_w) / max(min(v[t] for v in per_w), 1e-30))
            for k, per_w in result["layers"].items()}


def plot(results: list[dict], path: str | Path) -> None:
    """One panel per parametrization: change at the last step vs width, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        t = r["steps"] - 1
        for k, per_w in r["layers"].items():
            ax.plot(r["widths"], [v[t] for v in per_w], marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (d_model)")
        ax.set_title(f"{r['parametrization'].upper()}: mean |h_t - h_0| after {r['steps']} Adam steps, lr {r['lr']:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |change| of layer output")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("coord-check", help="μP coordinate check: activation change vs width under SP and μP",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="32,64,128,256,512", help="comma-separated d_model values (default 32..512)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate, constant (default 1e-2)")
    p.add_argument("--steps", type=int, default=5, help="Adam steps (default 5)")
    p.add_argument("--base-width", dest="base_width", type=int, default=None, help="μP base width (default: the first width)")
    p.add_argument("--layers", type=int, default=2, help="blocks (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads at every width (default 4)")
    p.add_argument("--parametrization", choices=("sp", "mup", "both"), default="both")
    p.add_argument("--plot", metavar="PNG", help="save the figure")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    from scaling.errors import UsageError

    try:
        widths = [int(w) for w in str(args.widths).split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--widths: expected comma-separated integers, got {args.widths!r}") from None
    if args.steps < 1:
        raise UsageError(f"--steps: must be >= 1, got {args.steps}")
    if not (args.lr > 0):
        raise UsageError(f"--lr: must be positive, got {args.lr}")
    kinds = ("sp", "mup") if args.parametrization == "both" else (args.parametrization,)
    results = [coord_check(widths, parametrization=k, lr=args.lr, steps=args.steps, base_width=args.base_width,
                           n_layers=args.layers, n_heads=args.heads) for k in kinds]
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps({r["parametrization"]: {**r, "spread": spread(r)} for r in results}, indent=1))
    else:
        for r in results:
            s = spread(r)
            print(f"{r['parametrization']}: max/min over widths {widths} of mean |h_{r['steps']} - h_0|: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in s.items()))
    return 0
