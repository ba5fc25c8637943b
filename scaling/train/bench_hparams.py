"""Compile seconds saved by traced hyperparameters on a learning-rate x warmup grid.

``scaling bench hparams [--json]`` builds the reference bench model's train step for an
8-point grid (4 peak learning rates x 2 warmups) two ways, in one process, with the persistent
compilation cache off: compiled hyperparameters (``step.make_train_step`` with the values baked
in: one compilation per point) and traced ones (``step.make_traced_train_step``: one
compilation, then each point's values passed to it). It reports both totals and checks that
the traced step reproduces each point's learning rate.
"""

from __future__ import annotations

import time

GRID_LR = (1e-3, 3e-3, 1e-2, 3e-2)
GRID_WARMUP = (10, 50)


def add_arguments(parser, kind: str = "hparams") -> None:
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)


def measure(args) -> dict:
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    jax.config.update("jax_enable_compilation_cache", False)  # measure compilations, not cache hits
    from scaling import sharding
    from scaling.config import MeshConfig, TrainConfig
    from scaling.models.transformer import Transformer
    from scaling.train import optim, step as step_lib

    base = TrainConfig().with_overrides({"model.d_model": args.d_model, "model.n_layers": args.n_layers,
                                         "model.n_heads": 4, "data.seq_len": args.seq_len,
                                         "data.batch_size": args.batch_size})
    grid = [dataclasses.replace(base.optim, lr=lr, warmup_steps=w) for lr in GRID_LR for w in GRID_WARMUP]
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with sharding.mesh_context(mesh):
        model = Transformer(base.model, rngs=nnx.Rngs(0))
        graphdef, params, rest = step_lib.split_model(model)
        tx = optim.make_optimizer(base.optim)
        state = step_lib.init_state(params, rest, tx, total_steps=100)
        rng = np.random.default_rng(0)
        tok = rng.integers(0, base.model.vocab_size, (args.batch_size, args.seq_len + 1), dtype=np.int32)
        batch = {"inputs": jax.numpy.asarray(tok[:, :-1]), "targets": jax.numpy.asarray(tok[:, 1:])}

        static_s = 0.0
        for ocfg in grid:
            fn = step_lib.make_train_step(graphdef, optim.make_optimizer(ocfg), z_loss_weight=ocfg.z_loss,
                                          lr_fn=optim.make_lr_fn(ocfg), donate=False)
            t = time.perf_counter()
            fn.lower(state, batch).compile()
            static_s += time.perf_counter() - t

        traced = step_lib.make_traced_train_step(graphdef, base.optim, donate=False)
        t = time.perf_counter()
        compiled = traced._jitted.lower(state, batch, traced.hparams).compile()
        traced_s = time.perf_counter() - t
        lr_ok = True
        for ocfg in grid:
            _, m = compiled(state, batch, optim.hparams(ocfg))
            want = float(optim.learning_rate(ocfg, 0, 100))
            lr_ok &= abs(float(m["lr"]) - want) <= 1e-7 * max(want, 1e-12)
    return {"grid_points": len(grid), "compiled_hparams_compile_s": static_s, "traced_hparams_compile_s": traced_s,
            "saved_s": static_s - traced_s, "ratio": static_s / traced_s if traced_s else float("nan"),
            "lr_reproduced": bool(lr_ok),
            "model": {"d_model": args.d_model, "n_layers": args.n_layers, "seq_len": args.seq_len,
                      "batch_size": args.batch_size}}


def report(out: dict) -> None:
    print(f"{out['grid_points']}-point LR x warmup grid, model {out['model']}")
    print(f"compiled hyperparameters: {out['compiled_hparams_compile_s']:7.2f} s of compilation "
          f"({out['grid_points']} programs)")
    print(f"traced hyperparameters:   {out['traced_hparams_compile_s']:7.2f} s (1 program)")
    print(f"saved {out['saved_s']:.2f} s ({out['ratio']:.1f}x); learning rates reproduced: {out['lr_reproduced']}")
