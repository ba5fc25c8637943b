"""Console progress bar on stderr: one line rewritten in place on a terminal (``\\r``), or a
plain line at most every ``interval_s`` seconds when stderr is a file/pipe (logs stay short)."""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    if s != s or s < 0 or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def format_line(step: int, total: int, *, loss: float, tokens_per_s: float, mfu: float, eta_s: float, width: int = 24) -> str:
    """``[#####-----]  step/total loss tok/s MFU ETA``."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    filled = int(round(frac * width))
    bar = "#" * filled + "-" * (width - filled)
    tps = f"{tokens_per_s / 1e3:.1f}K" if tokens_per_s < 1e6 else f"{tokens_per_s / 1e6:.2f}M"
    return (f"[{bar}] {step}/{total} loss {loss:.4f}  {tps} tok/s  MFU {100 * mfu:.1f}%  "
            f"ETA {_fmt_time(eta_s)}")


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, stream=None, interval_s: float = 10.0):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self._last = -float("inf")
        self._dirty = False

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        line = format_line(step, self.total, **fields)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._dirty = True
        elif now - self._last >= self.interval_s or step >= self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last = now

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (eval results, warnings)."""
        if not self.enabled:
            return
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False
