"""``scaling sample RUN_DIR``: text from a trained run's newest checkpoint.

Loads ``RUN_DIR/config.json`` and the newest readable checkpoint (read-only: nothing in the run
directory changes), encodes the prompt with the run's tokenizer and samples with
``scaling.models.sample.generate``. Mixture-of-depths models sample with their causal routing
decisions (the top-k used in training looks at future tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run's newest checkpoint",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run directory written by scaling train / scaling sweep")
    p.add_argument("--prompt", default="def ", help="text to continue (default: 'def ')")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--samples", type=int, default=1, help="independent continuations (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def load_model(run_dir: str | Path):
    """``(TrainConfig, nnx model with the newest checkpoint's parameters, step)`` of a run."""
    import logging

    import jax
    from flax import nnx

    from scaling.errors import UsageError
    from scaling.config import TrainConfig
    from scaling.models.transformer import Transformer
    from scaling.train import optim, step as step_lib
    from scaling.train.checkpoint import Checkpointer

    from scaling import storage

    run = storage.path(run_dir)
    try:
        d = json.loads((run / "config.json").read_text())
    except OSError:
        raise UsageError(f"RUN_DIR: no config.json in {run} (is it a run directory from scaling train?)") from None
    from scaling.schema import config_fields

    cfg = TrainConfig.from_dict(config_fields(d))
    # the attention kernel is the machine's choice, not the run's: a run trained with cudnn on a
    # GPU samples and evaluates here with what this backend has (the same maths)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="auto"))
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns that read-only managers do not save
    from scaling.train.loop import checkpoint_location

    ckpt = Checkpointer(checkpoint_location(cfg, run, recorded=d), read_only=True)
    if ckpt.latest_step() is None:
        raise UsageError(f"RUN_DIR: {run} has no checkpoint yet (train it first)")
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = step_lib.split_model(model)
    target = step_lib.init_state(params, rest, optim.make_optimizer(cfg.optim, model_cfg=cfg.model))
    step, state, _, _ = ckpt.restore_latest(target)
    ckpt.close()
    state = jax.device_get(state)
    return cfg, nnx.merge(graphdef, state["params"], state["rest"]), step


def main(args) -> int:
    import jax
    import numpy as np

    from scaling.errors import UsageError
    from scaling.data.corpus import tokenizer_for
    from scaling.models.sample import generate

    if args.tokens < 1:
        raise UsageError(f"--tokens: must be >= 1, got {args.tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.samples < 1:
        raise UsageError(f"--samples: must be >= 1, got {args.samples}")
    if not args.prompt:
        raise UsageError("--prompt: needs at least one character")
    cfg, model, step = load_model(args.run)
    tok = tokenizer_for(cfg.data)  # the run's own (a changed tokenizer file is refused on training resume)
    if tok is None:
        raise UsageError(f"{args.run}: trained on synthetic tokens, which have no text to sample")
    from pathlib import Path

    from scaling.data.tokenize import fingerprint
    from scaling.train.loop import check_tokenizer

    check_tokenizer(storage_path(args.run), fingerprint(tok))
    prompt = np.asarray(tok.encode(args.prompt), np.int32)
    batch = np.broadcast_to(prompt, (args.samples, prompt.size))
    out = np.asarray(generate(model, batch, args.tokens, key=jax.random.key(args.seed), temperature=args.temperature,
                              context=cfg.data.seq_len))
    print(f"{args.run}: step {step}, temperature {args.temperature:g}", file=sys.stderr)
    for i, row in enumerate(out):
        if args.samples > 1:
            print(f"--- sample {i}")
        print(tok.decode(row))
    return 0


def storage_path(p):
    from scaling import storage

    return storage.path(p)
