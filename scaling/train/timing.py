"""Timing the trainer's own compiled step on random tokens (what the benches measure).

``prepare_train_step(cfg, mesh, gns_every=0)`` builds the model, optimizer state and jitted
step as ``scaling train`` does on its steps without noise-scale statistics (``gns_every=N``:
statistics every N steps) (``scaling.train.step``, sharded on ``mesh``) and compiles it;
``time_train_step`` times it. Used by ``scaling bench train`` (``scaling.train.bench``) and
``scaling bench moe|mod`` (``scaling.models.bench``).
"""

from __future__ import annotations

import time


def prepare_train_step(cfg, mesh, *, gns_every: int = 0):
    """Compiled train step of ``cfg`` on ``mesh``, its initial state and a random-token batch.

    Returns ``(compiled, state, batch, compile_s)``; one warm-up step has already run. The step
    accumulates as ``data.microbatch`` asks and computes noise-scale statistics every
    ``gns_every`` steps (0, the default: never, the trainer's step between statistics steps).
    """
    import jax
    import numpy as np
    from flax import nnx

    from scaling import sharding
    from scaling.models.transformer import Transformer
    from scaling.train import optim, step as step_lib

    with sharding.mesh_context(mesh):
        model = sharding.create_sharded_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, rest = step_lib.split_model(model)
        tx = optim.make_optimizer(cfg.optim, model_cfg=cfg.model)
        state = step_lib.init_state(params, rest, tx, total_steps=1000, mesh=mesh)
        accum, shards = sharding.accumulation(cfg.data, mesh)
        train_step = step_lib.make_traced_train_step(graphdef, cfg.optim, cfg.model, accum=accum, shards=shards,
                                                     gns_every=gns_every)
        rng = np.random.default_rng(0)
        b, l, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
        tokens = rng.integers(0, v, size=(b, l + 1), dtype=np.int32)
        batch = sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
        t = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
    return compiled, state, batch, compile_s


def time_train_step(cfg, mesh, *, steps: int, gns_every: int = 0) -> dict:
    """Compile and time the train step of ``cfg`` on ``mesh`` with random tokens.

    Returns ``compile_s``, ``step_s`` (seconds per step: the median over ``steps`` timed blocks
    of ``max(gns_every, 1)`` consecutive steps, so a block holds one statistics step) and
    ``final_loss``.
    """
    import jax
    import numpy as np

    compiled, state, batch, compile_s = prepare_train_step(cfg, mesh, gns_every=gns_every)
    block = max(gns_every, 1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for _ in range(block):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / block)
    return {"compile_s": compile_s, "step_s": float(np.median(times)), "final_loss": float(m["loss"])}
