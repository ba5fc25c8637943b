"""Checkpoints: an orbax ``CheckpointManager`` holding three items per step,

- ``state``: the train state pytree (params, other model state, optimizer state, step),
- ``data``: the grain iterator state (``iterator.get_state()``, JSON),
- ``meta``: run metadata (step, best loss so far, planned total steps, training seconds, ...).

Saves are synchronous and atomic (orbax writes to a temporary directory and renames it when
complete, so a killed process never leaves a half-written step that looks finished). Kept: the
last ``keep`` steps plus every step in ``keep_steps`` (WSD branch points).

Integrity: after each save, the CRC-32 and size of every file of the step are recorded in our own
manifest beside orbax's, ``<run>/ckpt_checksums/<step>.json``, and checked before a restore, so
flipped bytes that orbax would load silently are caught. If the newest step fails that check or
cannot be read (truncated or corrupt files), it is moved to ``<run>/ckpt_corrupt/`` with a
one-line warning and the previous step is tried; when none is usable the run says so in one line
and starts from step 0. Steps saved before checksums existed are restored unchecked.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from scaling import faults, storage
from scaling.errors import CheckpointCorrupt, CheckpointWarning
from scaling.files import read_json, write_json_atomic

ITEMS = ("state", "data", "meta")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_checksums(step_dir: Path) -> dict[str, list[int]]:
    """``{relative path: [size in bytes, crc32]}`` for every file under ``step_dir``."""
    return {str(f.relative_to(step_dir)): [f.stat().st_size, _crc32(f)]
            for f in sorted(step_dir.rglob("*")) if f.is_file()}


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for one run directory's ``ckpt/``."""

    def __init__(self, directory: str | Path, *, keep: int = 2, keep_steps: tuple[int, ...] = (), read_only: bool = False):
        # a URL (gs://) goes to orbax as is: it writes object stores natively (tensorstore);
        # the CRC manifests and quarantine below are for local files (stores checksum objects)
        self.remote = storage.is_url(str(directory))
        if self.remote:
            from etils import epath

            self.directory = epath.Path(str(directory))
        else:
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

    @property
    def checksum_dir(self) -> Path:
        """``<dir>_checksums`` next to the checkpoint directory (``ckpt_checksums`` for ``ckpt``),
        so two checkpoint directories in one parent never share manifests."""
        return self.directory.with_name(self.directory.name + "_checksums")

    def verify(self, step: int) -> None:
        """Raise ``CheckpointCorrupt`` naming the first file of ``step`` that differs from its
        manifest (a step without a manifest, saved by an older version, passes)."""
        if self.remote:
            return
        recorded = read_json(self.checksum_dir / f"{step}.json")
        if not isinstance(recorded, dict):
            return
        step_dir = self.directory / str(step)
        now = file_checksums(step_dir)
        for name, (size, crc) in recorded.get("files", {}).items():
            if name not in now:
                raise CheckpointCorrupt(f"{name} is missing")
            if now[name] != [size, crc]:
                raise CheckpointCorrupt(f"{name} does not match its recorded checksum")

    def _record(self, step: int) -> None:
        write_json_atomic(self.checksum_dir / f"{step}.json",
                          {"step": step, "algorithm": "crc32", "files": file_checksums(self.directory / str(step))},
                          indent=None)
        keep = {str(s) for s in self.steps()}
        for f in self.checksum_dir.glob("*.json"):  # steps orbax has deleted
            if f.stem not in keep:
                f.unlink(missing_ok=True)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Save all three items at ``step`` (blocking), then record its checksums. A failed save
        (e.g. a full disk) leaves no orbax temporary directory behind."""
        # one process tends the local files (the temp directory is shared); a store has none
        tends = jax.process_index() == 0 and not self.remote
        if tends:
            (self.checksum_dir / f"{step}.json").unlink(missing_ok=True)  # never judge new files by old sums
        try:
            self._save(step, state, data_state, meta)
        except BaseException:
            if tends:
                for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
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
        faults.point("checkpoint_save", step)
        if jax.process_index() == 0 and not self.remote:
            self._record(step)

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """``(state, data_state, meta)`` at ``step``; ``target`` gives structure, dtypes and
        shardings. Raises ``CheckpointCorrupt`` when the step's files fail their checksums."""
        self.verify(step)
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
        """Restore the newest step that passes its checksums and reads back, quarantining
        unusable newer ones; None if there is none (said in one line when some were tried)."""
        tried = 0
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.CRITICAL)  # orbax logs a traceback per failed read; we say one line
        try:
            while True:
                step = self.latest_step()
                if step is None:
                    if tried:
                        print(f"{self.directory}: no usable checkpoint: restarting from step 0", file=sys.stderr)
                    return None
                tried += 1
                try:
                    state, data_state, meta = self.restore(step, target)
                    return step, state, data_state, meta
                except Exception as err:  # orbax raises many kinds for truncated/corrupt files
                    if self.read_only or self.remote:
                        raise
                    if not isinstance(err, CheckpointCorrupt) and (self.checksum_dir / f"{step}.json").exists():
                        # the files match their checksums: not corruption (out of memory, a
                        # changed state structure, I/O trouble); keep the step and say so
                        raise
                    self._quarantine(step, err)
        finally:
            absl.setLevel(level)

    def _quarantine(self, step: int, err: Exception) -> None:
        step_dir = self.directory / str(step)
        dest = self.directory.with_name(self.directory.name + "_corrupt") / str(step)
        n = 1
        while dest.exists():  # never overwrite an earlier quarantined copy
            dest = dest.with_name(f"{step}.{n}")
            n += 1
        msg = (f"checkpoint step {step} in {self.directory} is unreadable "
               f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
               f"moved to {dest} and falling back to the previous checkpoint")
        warnings.warn(msg, CheckpointWarning, stacklevel=3)
        print(f"warning: {msg}", file=sys.stderr)
        if jax.process_index() == 0:  # every process found it unreadable; one moves it
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(step_dir), str(dest))
            (self.checksum_dir / f"{step}.json").unlink(missing_ok=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"scaling-quarantine-{step}")
        self._manager.close()
        self._manager = self._make()  # re-read the step list from disk

    def close(self) -> None:
        self._manager.close()
