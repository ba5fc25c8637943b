"""The one console progress display, for the trainer's steps and the sweep's trials (tqdm).

On a terminal the line is redrawn in place by ``tqdm`` and ``message`` prints above it; when
stderr is a file or a pipe (a sweep's ``log.txt``, a SLURM log) the same line, rendered by
tqdm's ``format_meter``, is written as a plain line at most every ``interval_s`` seconds, at the
end, and whenever the caller says the news matters (``force``), so logs stay short.
"""

from __future__ import annotations

import sys
import time

TRAIN_FORMAT = "[{bar:24}] {n}/{total} {desc}"  # bar, step/total, then the caller's text
TEXT_FORMAT = "{desc}"  # the caller's text alone
_ASCII = "-#"  # empty, full: plain characters read well in log files


def fmt_duration(s: float) -> str:
    """``mm:ss`` or ``h:mm:ss``; ``?`` for an unknown (NaN, negative, infinite) duration."""
    if s != s or s < 0 or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def train_text(*, loss: float, tokens_per_s: float, mfu: float, eta_s: float) -> str:
    """The trainer's part of the line: ``loss 2.1234  80.0K tok/s  MFU 3.2%  ETA 01:10``."""
    tps = f"{tokens_per_s / 1e3:.1f}K" if tokens_per_s < 1e6 else f"{tokens_per_s / 1e6:.2f}M"
    return f"loss {loss:.4f}  {tps} tok/s  MFU {100 * mfu:.1f}%  ETA {fmt_duration(eta_s)}"


class ProgressLine:
    """A live status line on ``stream`` (stderr by default).

    ``total``: the count the bar fills to (steps), or ``None`` for a text-only line;
    ``update(text, n=...)`` redraws it; ``message(text)`` prints a line the bar never overwrites.
    """

    def __init__(self, total: int | None = None, *, enabled: bool = True, stream=None, interval_s: float = 10.0,
                 bar_format: str | None = None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.bar_format = bar_format or (TRAIN_FORMAT if total is not None else TEXT_FORMAT)
        self._bar = None
        self._last_t = -float("inf")
        self._n = 0
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, bar_format=self.bar_format, ascii=_ASCII,
                             dynamic_ncols=True, leave=True, mininterval=0, disable=False)

    def render(self, text: str, n: int | None = None) -> str:
        """The line as it is shown (bar, counts and ``text``)."""
        from tqdm import tqdm

        return tqdm.format_meter(n=self._n if n is None else n, total=self.total, elapsed=0,
                                 bar_format=self.bar_format, prefix=text, ascii=_ASCII)

    def update(self, text: str, *, n: int | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        if n is not None:
            self._n = n
        if self._bar is not None:
            self._bar.n = self._n
            self._bar.set_description_str(text, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        done = self.total is not None and self._n >= self.total
        if force or done or now - self._last_t >= self.interval_s:
            self.stream.write(self.render(text) + "\n")
            self.stream.flush()
            self._last_t = now

    def message(self, text: str) -> None:
        """A line that stays (eval results, warnings), printed above the live line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
