"""Seeded fault points, so the fault-injection tests kill a process at an exact place instead
of at a random moment.

``SCALING_KILL_AT="POINT:N"`` makes the process SIGKILL itself when it reaches ``POINT`` with
count ``N``. The points:

- ``train_step:N``: the trainer has computed step ``N`` and logged nothing about it yet;
- ``checkpoint_save:N``: orbax has written step ``N``, its checksum manifest is not written yet;
- ``sweep_result:N``: the local sweep runner has received its ``N``-th trial result.

Unset (always, outside those tests) a point costs one comparison. Standard library only.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("SCALING_KILL_AT")


def point(name: str, count: int) -> None:
    """SIGKILL this process if ``SCALING_KILL_AT`` is ``f"{name}:{count}"``."""
    if _TARGET is not None and _TARGET == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
