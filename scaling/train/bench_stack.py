"""Stacked trials vs one at a time: training-step throughput of K same-shape trials.

``scaling bench stack [--trials K] [--steps N] [--json]`` builds ``K`` tiny trials of one shape
(seeds 0..K-1, learning rates 1e-3 x 1.5^i), times ``N`` steps of each trained alone with the
trainer's traced step (compiled once, trial after trial) and ``N`` steps of all of them as one
vmapped program (``scaling.train.stack``), in one process on the same batches, and reports

    speedup = (seconds of K x N solo steps) / (seconds of N stacked steps)

with the largest difference between a trial's stacked and solo losses (vmapped matmuls sum in
another order; not bitwise), and, for scale, how one solo step's time grows with the batch
(``batch_x8_time_ratio``: a step over 8x the rows, in time units of one step; 8 means the step
was compute-bound already, so stacking has no per-step overhead to amortise).
"""

from __future__ import annotations

import time


def add_arguments(parser, kind: str = "stack") -> None:
    parser.add_argument("--trials", type=int, default=8, help="trials in the stack (default 8)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per trial (default 30)")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)


def _timed(fn, n: int) -> float:
    import jax

    t = time.perf_counter()
    out = None
    for i in range(n):
        out = fn(i)
    jax.block_until_ready(out)
    return time.perf_counter() - t


def measure(args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from scaling.config import TrainConfig
    from scaling.errors import UsageError
    from scaling.models.transformer import Transformer
    from scaling.train import optim, stack
    from scaling.train import step as step_lib

    if args.trials < 1 or args.steps < 1:
        raise UsageError("--trials and --steps: must be at least 1")
    K, N, B, L = args.trials, args.steps, args.batch_size, args.seq_len
    cfg = TrainConfig().with_overrides({"model.d_model": args.d_model, "model.n_layers": args.n_layers,
                                        "model.n_heads": 2, "data.seq_len": L, "data.batch_size": B,
                                        "optim.gns_every": 0})
    optims = [dataclasses.replace(cfg.optim, lr=1e-3 * 1.5 ** i) for i in range(K)]
    tx = optim.make_optimizer(cfg.optim, model_cfg=cfg.model)
    states, graphdef = [], None
    for i in range(K):
        graphdef, params, rest = step_lib.split_model(Transformer(cfg.model, rngs=nnx.Rngs(i)))
        states.append(step_lib.init_state(params, rest, tx, total_steps=10 * N))
    rng = np.random.default_rng(0)
    V = cfg.model.vocab_size
    batches = [[{"inputs": rng.integers(0, V, (B, L), dtype=np.int32), "targets": rng.integers(0, V, (B, L), dtype=np.int32)}
                for _ in range(K)] for _ in range(N)]

    solo = step_lib.make_traced_train_step(graphdef, cfg.optim, cfg.model, donate=False, gns_every=0)
    solo_steps = [solo.with_hparams(o, cfg.model) for o in optims]
    stacked = stack.make_stacked_train_step(graphdef, cfg.optim, cfg.model, donate=False)
    hp = stack.stacked_hparams(optims, cfg.model)
    active = jnp.ones((K,), bool)
    stacked_batches = [stack.stack_trees(bs) for bs in batches]

    t = time.perf_counter()
    jax.block_until_ready(solo_steps[0](states[0], batches[0][0]))
    solo_compile = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(stacked(stack.stack_trees(states), stacked_batches[0], hp, active))
    stack_compile = time.perf_counter() - t

    solo_losses: list[list] = []
    solo_s = 0.0
    for k in range(K):
        s, losses = states[k], []

        def one(i, k=k, losses=losses):
            nonlocal s
            s, m = solo_steps[k](s, batches[i][k])
            losses.append(m["loss"])  # device arrays: read after the timing, as the stacked ones
            return m["loss"]

        solo_s += _timed(one, N)
        solo_losses.append(losses)
    solo_losses = np.array([[float(x) for x in losses] for losses in solo_losses])
    st = stack.stack_trees(states)
    stack_losses = []

    def one_stacked(i):
        nonlocal st
        st, m = stacked(st, stacked_batches[i], hp, active)
        stack_losses.append(m["loss"])  # device arrays: read after the timing
        return m["loss"]

    stack_s = _timed(one_stacked, N)
    stack_losses = np.stack([np.asarray(x) for x in stack_losses], axis=1)

    big = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=8 * B))
    graphdef_b, params_b, rest_b = step_lib.split_model(Transformer(big.model, rngs=nnx.Rngs(0)))
    state_b = step_lib.init_state(params_b, rest_b, tx, total_steps=10 * N)
    batch_b = {k: np.concatenate([batches[0][0][k]] * 8) for k in ("inputs", "targets")}
    jax.block_until_ready(solo(state_b, batch_b))
    one_b = _timed(lambda i: solo(state_b, batch_b)[1]["loss"], N) / N
    one_s = _timed(lambda i: solo(states[0], batches[0][0])[1]["loss"], N) / N
    return {
        "backend": jax.default_backend(), "trials": K, "steps": N, "shape": f"d{args.d_model}L{args.n_layers}",
        "seq_len": L, "batch_size": B, "solo_s": solo_s, "stacked_s": stack_s, "speedup": solo_s / stack_s,
        "solo_compile_s": solo_compile, "stacked_compile_s": stack_compile,
        "max_abs_loss_diff": float(np.max(np.abs(stack_losses - solo_losses))),
        "bitwise_fraction": float(np.mean(stack_losses == solo_losses)),
        "batch_x8_time_ratio": one_b / one_s,
    }


def report(out: dict) -> None:
    print(f"{out['trials']} same-shape trials ({out['shape']}, seq {out['seq_len']}, batch {out['batch_size']}, "
          f"{out['steps']} steps each) on {out['backend']}: one at a time {out['solo_s']:.2f} s, stacked "
          f"{out['stacked_s']:.2f} s -> speedup {out['speedup']:.2f}x (target >= 2.5x); stacked vs solo losses differ "
          f"by at most {out['max_abs_loss_diff']:.2g} nats ({100 * out['bitwise_fraction']:.0f}% bitwise); a step over "
          f"8x the batch takes {out['batch_x8_time_ratio']:.1f}x one step")
