"""Every error type the framework raises on purpose: the bottom floor of the house.

This module imports nothing but the standard library, so any module (the numpy-only fitter,
the trainer, the sweep runner, the CLI) can raise and catch the same classes. The CLI
(``scaling.cli.main``) turns each ``ScalingError`` into one line on stderr and exit status 2;
everything else is a bug and keeps its traceback.

``str(err)`` is always one line that names the field, file or flag at fault and the fix.
"""

from __future__ import annotations


class ScalingError(ValueError):
    """Base of the errors the CLI reports as one line with exit status 2."""


class ConfigError(ScalingError):
    """A bad configuration value; the message starts with the field (``model.d_model: ...``)."""


class UsageError(ScalingError):
    """Bad command-line or file input (a flag, a table, a directory that is not a run)."""


class RunDirBusy(ScalingError):
    """A run or trial directory is leased by another live process (``scaling.lease``)."""

    def __init__(self, path, holder: dict | None = None):
        self.path = str(path)
        self.holder = dict(holder or {})
        pid, host = self.holder.get("pid", "?"), self.holder.get("host", "?")
        super().__init__(f"{self.path}: run directory is in use by PID {pid} on {host}; "
                         f"wait for it to finish, or use another --out")


class LeaseLost(ScalingError):
    """This process's lease on a run directory was taken over (it was judged stale)."""


class SchemaError(ScalingError):
    """Run directories measured under different schema versions were mixed in one table."""


class CheckpointCorrupt(RuntimeError):
    """A checkpoint step's files differ from their recorded checksums. Not a usage error: the
    trainer catches it, quarantines the step and falls back to an older one."""


class CheckpointWarning(RuntimeWarning):
    """A checkpoint step was unusable and set aside; the trainer also prints it as one line."""


# The exit status the CLI gives every ScalingError.
EXIT_USAGE = 2
