"""Metrics writers and the FLOP/s peak used for MFU.

``metrics.jsonl`` is the source of truth (one JSON object per logged step, appended and flushed
as it is written); wandb only mirrors it. ``summary.json`` is written atomically.

MFU = achieved model FLOP/s (counted training FLOPs per token x tokens/s, from
``scaling.flops``) / peak FLOP/s of the devices the run uses. The peak is, in order:

1. the environment variable ``SCALING_PEAK_FLOPS`` (FLOP/s for the whole process),
2. on GPU/TPU, ``PEAK_TABLE`` below (vendor dense bf16 peaks per chip, times the device count;
   float32 runs on those chips therefore report MFU against the bf16 peak, as MaxText does),
3. on CPU, a float32 matmul benchmark (best of a few 2048^3 matmuls on one device, i.e. all the
   cores XLA's thread pool uses), measured once and cached in ``peak_flops.json`` under
   ``scaling.train.cache.cache_root()`` (``~/.cache/scaling``),
   keyed by backend, device kind and core count.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from scaling import storage
from scaling.files import JsonlAppender, write_json_atomic
from scaling.train.cache import cache_root

# dense bf16 FLOP/s per chip, vendor figures
PEAK_TABLE = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia a100": 312e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia b200": 2250e12,
}



def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 matmul FLOP/s on the default device: best time of ``repeats`` n x n x n products."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


_PEAK: float | None = None


def peak_flops(n_devices: int | None = None) -> float:
    """Peak FLOP/s for MFU (see the module docstring for where it comes from)."""
    global _PEAK
    env = os.environ.get("SCALING_PEAK_FLOPS")
    if env:
        return float(env)
    import jax

    devices = jax.devices()
    n = n_devices or len(devices)
    kind = devices[0].device_kind.lower()
    if devices[0].platform != "cpu":
        for name, flops in PEAK_TABLE.items():
            if kind.startswith(name):
                return flops * n
    if _PEAK is not None:
        return _PEAK
    key = f"{devices[0].platform}|{kind}|{os.cpu_count()}"
    path = cache_root() / "peak_flops.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        # CPU: host devices share the same cores, so one device's matmul peak is the machine's
        cached[key] = measure_matmul_flops()
        try:
            write_json_atomic(path, cached)
        except OSError:
            pass
    _PEAK = float(cached[key])
    return _PEAK


# ----------------------------------------------------------------------------------------------
# metrics.jsonl (the format and its reader/writer live in scaling.files)
# ----------------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends rows to ``metrics.jsonl``. On open (a resume), every valid row with
    ``step <= keep_through_step`` is kept, rows beyond it are dropped (they will be logged
    again), and unreadable lines are skipped, counted and moved to ``metrics.jsonl.bad``.
    ``read_only`` (the other processes of a multi-host run): nothing is read or written
    (``kept`` is empty; process 0 writes the summary that would use it)."""

    def __init__(self, path: str | Path, *, keep_through_step: int, read_only: bool = False):
        def keep(row: dict) -> bool:
            step = row.get("step", 0)
            return not isinstance(step, (int, float)) or step <= keep_through_step

        self.path = storage.path(path)
        if read_only:  # process 0 may be rewriting the file: the others need none of its rows
            self._out = None
            self.kept = []
        else:
            self._out, self.kept = JsonlAppender.resume(path, keep=keep)

    def write(self, row: dict) -> None:
        if self._out is not None:
            self._out.write(row)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


class WandbMirror:
    """Mirrors metric rows to wandb. ``mode``: off | offline | online. Online needs
    ``WANDB_API_KEY``; without one it falls back to offline with a message. A missing or failing
    wandb never stops training (metrics.jsonl is the truth)."""

    def __init__(self, mode: str, *, run_dir: Path, run_id: str, name: str, config: dict,
                 project: str | None = None, group: str | None = None, tags: tuple[str, ...] = ()):
        self.run = None
        if mode == "off" or os.environ.get("WANDB_MODE") == "disabled":
            return
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("wandb: WANDB_API_KEY is not set; logging offline (sync later with `wandb sync`)", file=sys.stderr)
            mode = "offline"
        try:
            import wandb

            # console="off": the console already goes to the terminal or the trial's log.txt
            # (wandb's capture would wrap the descriptors a sweep worker redirects);
            # reinit="create_new": the lanes of a stack keep one live run each in one process
            self.run = wandb.init(mode=mode, dir=str(run_dir), id=run_id, name=name or run_id,
                                  config=config, resume="allow", reinit="create_new", project=project, group=group,
                                  tags=list(tags) or None, settings=wandb.Settings(console="off"))
        except Exception as err:  # wandb problems must not kill a run
            print(f"wandb: disabled ({type(err).__name__}: {err})", file=sys.stderr)
            self.run = None

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=int(row["step"]))

    def summary(self, summary: dict) -> None:
        if self.run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_grouping(cfg, out) -> dict:
    """``project``, ``group`` and ``tags`` for a run's wandb mirror, from the config and where
    it runs: project ``$WANDB_PROJECT`` or ``"scaling"``; group the sweep's name when the run
    is a sweep trial (its parent holds the sweep's ``manifest.json``), else the run directory's
    name; tags the experiment, budget, shape and seed (wandb keeps tags to 64 characters)."""
    from scaling.files import read_json

    manifest = read_json(out.parent / "manifest.json") if out.parent != out else None
    group = manifest.get("name") if isinstance(manifest, dict) and manifest.get("name") else out.name
    b = cfg.budget
    tags = (cfg.experiment, f"{b.kind}={b.value:g}", f"d{cfg.model.d_model}L{cfg.model.n_layers}", f"seed={cfg.seed}")
    return {"project": os.environ.get("WANDB_PROJECT") or "scaling", "group": group,
            "tags": tuple(t[:64] for t in tags)}


def hardware_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token the kernels chosen on this backend compute (HFU's numerator per
    token): the resolved attention kernel, ``model.remat``, the dropless MoE backend."""
    from scaling import flops
    from scaling.models.layers import attention_implementation
    from scaling.models.moe import resolve_backend

    grouped = resolve_backend(model) if model.moe is not None else "ragged_dot"
    return float(flops.hardware_train_flops_per_token(model, seq_len, attention_implementation(model, seq_len=seq_len), grouped))
