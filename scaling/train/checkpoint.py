"""Checkpoints: an orbax ``CheckpointManager`` holding three items per step,

- ``state``: the train state pytree (params, other model state, optimizer state, step),
- ``data``: the grain iterator state (``iterator.get_state()``, JSON),
- ``meta``: run metadata (step, best loss so far, planned total steps, training seconds, ...).

Saves are synchronous and atomic (orbax writes to a temporary directory and renames it when
complete, so a killed process never leaves a half-written step that looks finished). Kept: the
last ``keep`` steps plus every step in ``keep_steps`` (WSD branch points). If the newest step
cannot be read (truncated or corrupt files), it is moved to ``<run>/ckpt_corrupt/`` with a
warning and the previous step is tried.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for one run directory's ``ckpt/``."""

    def __init__(self, directory: str | Path, *, keep: int = 2, keep_steps: tuple[int, ...] = (), read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.keep_steps = tuple(keep_steps)
        self.read_only = read_only
        self._manager = self._make()

    def _make(self) -> ocp.CheckpointManager:
        policies = [ocp.checkpoint_managers.LatestN(n=self.keep)]
        if self.keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(steps=list(self.keep_steps)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies=policies),
            enable_async_checkpointing=False,
            create=not self.read_only,
            read_only=self.read_only,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Save all three items at ``step`` (blocking)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """``(state, data_state, meta)`` at ``step``; ``target`` gives structure, dtypes and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["meta"]

    def restore_latest(self, target: Any) -> tuple[int, Any, dict, dict] | None:
        """Restore the newest readable step, quarantining unreadable newer ones; None if none."""
        while True:
            step = self.latest_step()
            if step is None:
                return None
            try:
                state, data_state, meta = self.restore(step, target)
                return step, state, data_state, meta
            except Exception as err:  # orbax raises many kinds for truncated/corrupt files
                if self.read_only:
                    raise
                self._quarantine(step, err)

    def _quarantine(self, step: int, err: Exception) -> None:
        step_dir = self.directory / str(step)
        dest = self.directory.parent / "ckpt_corrupt" / str(step)
        msg = (f"checkpoint step {step} in {self.directory} is unreadable "
               f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
               f"moved to {dest} and falling back to the previous checkpoint")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        print(f"warning: {msg}", file=sys.stderr)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(step_dir), str(dest))
        self._manager.close()
        self._manager = self._make()  # re-read the step list from disk

    def close(self) -> None:
        self._manager.close()
