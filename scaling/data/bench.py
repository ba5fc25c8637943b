"""Data-loader throughput against training: ``scaling bench data``.

Measures, in one process, tokens/s of the training iterator (``loader.make_train_iterator``,
the one ``scaling train`` reads) for the in-memory stdlib corpus and for shards (``--shards
DIR``, default: the stdlib at byte level prepared into a temporary directory), in-process and
with ``--workers`` grain worker processes, and the training step of the benchmark model
(``scaling bench train``'s reference model, d_model 256, 4 layers, seq 256, batch 16). Reports
each loader's headroom = loader tokens/s / training tokens/s (target on CPU: >= 10x).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def add_arguments(parser, kind: str = "data") -> None:
    parser.add_argument("--shards", default=None, metavar="DIR", help="shard directory to read (default: stdlib bytes, prepared now)")
    parser.add_argument("--workers", type=int, default=2, help="grain worker processes for the second shard reading (default 2)")
    parser.add_argument("--batches", type=int, default=300, help="batches timed per loader (default 300)")
    parser.add_argument("--train-steps", dest="train_steps", type=int, default=5, help="timed training steps (default 5)")


def _loader_tokens_per_s(cfg, batches: int) -> float:
    from scaling.data import loader

    it = loader.make_train_iterator(cfg, seed=0)
    for _ in range(3):  # worker start-up and first permutation are not throughput
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    if hasattr(it, "close"):
        it.close()
    return batches * cfg.batch_size * cfg.seq_len / dt


def measure(args) -> dict:
    import jax

    from scaling import sharding
    from scaling.config import DataConfig, MeshConfig, TrainConfig
    from scaling.data import shards
    from scaling.train.bench import REFERENCE
    from scaling.train.timing import time_train_step

    shape = dict(seq_len=REFERENCE["seq_len"], batch_size=REFERENCE["batch_size"])
    tmp = None
    path = args.shards
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="scaling-bench-data-")
        path = str(Path(tmp.name) / "stdlib-bytes")
        shards.prepare(DataConfig(), Path(path), log=lambda s: None)
    m = shards.read_manifest(path)
    loaders = {
        "memory stdlib (in-process)": DataConfig(**shape),
        "shards (in-process)": DataConfig(source="shards", path=path, **shape),
        f"shards ({args.workers} workers)": DataConfig(source="shards", path=path, worker_count=args.workers, **shape),
    }
    out = {"shards": path, "shards_tokenizer": m["tokenizer"]["spec"], "loaders": {}}
    for name, cfg in loaders.items():
        out["loaders"][name] = _loader_tokens_per_s(cfg, args.batches)
    cfg = TrainConfig().with_overrides({
        "model.d_model": REFERENCE["d_model"], "model.n_layers": REFERENCE["n_layers"],
        "model.n_heads": REFERENCE["n_heads"], "model.vocab_size": REFERENCE["vocab_size"],
        "data.seq_len": shape["seq_len"], "data.batch_size": shape["batch_size"]})
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    step = time_train_step(cfg, one, steps=args.train_steps)
    out["train_tokens_per_s"] = cfg.tokens_per_step / step["step_s"]
    out["headroom"] = {k: v / out["train_tokens_per_s"] for k, v in out["loaders"].items()}
    out["backend"] = jax.default_backend()
    if tmp is not None:
        tmp.cleanup()
    return out


def report(out: dict) -> None:
    print(f"benchmark model training: {out['train_tokens_per_s']:10.0f} tokens/s ({out['backend']})")
    print(f"shards: {out['shards']} ({out['shards_tokenizer']})")
    for name, tps in out["loaders"].items():
        print(f"{name:32s} {tps:12.0f} tokens/s  headroom {out['headroom'][name]:8.1f}x")
