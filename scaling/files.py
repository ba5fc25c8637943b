"""The two on-disk formats of every run and sweep directory, with one owner each.

- **JSON files** (``config.json``, ``summary.json``, ``manifest.json``, ``trial.json``,
  ``status.json``) are written atomically by ``write_json_atomic``: a temp file in the same
  directory, written, fsynced, then renamed over the target. A reader sees the old file or the
  new one, never half of one; a kill leaves at most a ``.*.tmp`` file beside it. Files get the
  process umask's permissions (0644 under the usual 022), so teammates on a shared disk can read.
- **JSON lines** (``metrics.jsonl``, ``events.jsonl``): one object per line, appended with one
  ``write`` per line. ``read_jsonl`` skips and counts lines that are not a JSON object (a torn
  last line from a kill, garbage from a bad disk or a hand edit) and never stops early, so a
  bad line never hides the valid rows after it.

Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so every file stays
strict JSON; readers (``scaling.runs``) turn them back into floats.

Standard library only: the numpy-only fitter reads through this module too.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from scaling import storage


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers, tuples/sets as lists and non-finite floats
    as strings (recursively), so ``json.dumps`` writes strict JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (TypeError, ValueError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def dumps_line(row: dict) -> str:
    """One JSONL line (with its newline) for ``row``."""
    return json.dumps(jsonable(row), allow_nan=False) + "\n"


# --------------------------------------------------------------------------------------------
# Atomic whole-file writes
# --------------------------------------------------------------------------------------------


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file + fsync + rename); the temp file is
    removed on any failure. Permissions follow the umask, like any file ``open`` creates. On an
    object store (``scaling.storage``) the object is put whole, which stores make atomic."""
    if storage.is_url(path):
        storage.path(path).write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """Make the rename durable (best effort: not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (sorted keys, non-finite floats as strings) atomically."""
    text = json.dumps(jsonable(obj), indent=indent, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())


def read_json(path: str | Path) -> Any | None:
    """The parsed JSON file, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(storage.path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------


class Rows(list):
    """The valid rows of a JSONL file (a plain ``list`` of dicts) plus ``bad``: the 1-based
    line numbers that were skipped, and ``bad_lines``: their text."""

    def __init__(self, rows: Iterable[dict] = (), bad: list[int] | None = None, bad_lines: list[str] | None = None):
        super().__init__(rows)
        self.bad = list(bad or [])
        self.bad_lines = list(bad_lines or [])


def read_jsonl(path: str | Path) -> Rows:
    """Every line of ``path`` that is a JSON object, in file order; other non-blank lines are
    skipped and counted in ``.bad``. A missing file is empty."""
    rows, bad, bad_lines = [], [], []
    if storage.is_url(path):
        data = _read_chunked(storage.path(path))
        if data is None:
            return Rows()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Rows()
    for i, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError
            obj = None
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad.append(i)
            bad_lines.append(raw.decode("utf-8", "replace"))
    return Rows(rows, bad, bad_lines)


def chunk_dir(path) -> "storage.StorePath":
    """Where the numbered chunk objects of a JSONL file on an object store live."""
    return path.with_name(path.name + ".chunks")


def _read_chunked(path) -> bytes | None:
    """A JSONL file on an object store: the base object then its chunks in order (None: none)."""
    parts = []
    if path.exists():
        parts.append(path.read_bytes())
    chunks = chunk_dir(path)
    for c in sorted(chunks.iterdir(), key=_chunk_order):
        parts.append(c.read_bytes())
    if not parts:
        return None
    return b"\n".join(p.rstrip(b"\n") for p in parts if p.strip()) + b"\n"


def _chunk_order(c) -> tuple[int, str]:
    """Chunks in order: by their leading number (a sequence or a time), then by name."""
    digits = len(c.name) - len(c.name.lstrip("0123456789"))
    return (int(c.name[:digits]) if digits else -1, c.name)


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row with a single ``O_APPEND`` write. A torn last line left by a killed writer
    is first closed with a newline, so it can never swallow this row. On an object store (any
    number of writers) the row is its own chunk object, named by time so readers keep the order."""
    if storage.is_url(path):
        import time

        p = storage.path(path)
        name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(3).hex()}.jsonl"
        (chunk_dir(p) / name).write_bytes(dumps_line(row).encode())
        return
    line = dumps_line(row).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if _ends_without_newline(fd):
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace ``path`` by ``rows`` (one per line) atomically."""
    write_bytes_atomic(path, "".join(dumps_line(r) for r in rows).encode())


class JsonlAppender:
    """An open JSONL file for one writer that appends many rows (the trainer's metrics).

    ``JsonlAppender.resume(path, keep=pred)`` first rewrites the file atomically with the valid
    rows for which ``keep(row)`` is true (a resumed run drops the rows it will log again; they
    are appended to ``<path>.rolled_back``) and moves unreadable lines to ``<path>.bad``
    (appended, never lost), with a one-line notice.
    """

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        if isinstance(self.path, storage.StorePath):  # objects cannot be appended to: numbered chunks
            self._f = None
            self._next_chunk = 1 + max((_chunk_order(c)[0] for c in chunk_dir(self.path).iterdir()), default=0)
            return
        self._f = open(self.path, "a+")
        if self._f.tell() and _ends_without_newline(self._f.fileno()):
            self._f.write("\n")

    @classmethod
    def resume(cls, path: str | Path, keep) -> tuple["JsonlAppender", Rows]:
        path = storage.path(path)
        rows = read_jsonl(path)
        kept, rolled_back = Rows([], rows.bad, rows.bad_lines), []
        for r in rows:
            (kept if keep(r) else rolled_back).append(r)
        if rolled_back:  # logged after the checkpoint the run resumes from: kept aside, not lost
            _append_text(path.with_name(path.name + ".rolled_back"), "".join(dumps_line(r) for r in rolled_back))
        if rows.bad:
            _append_text(path.with_name(path.name + ".bad"), "".join(line + "\n" for line in rows.bad_lines))
            where = ", ".join(map(str, rows.bad[:5])) + (" ..." if len(rows.bad) > 5 else "")
            print(f"{path}: skipped {len(rows.bad)} unreadable line(s) (line {where}); kept every valid row, "
                  f"the bad lines are in {path.name}.bad", file=sys.stderr)
        if isinstance(path, storage.StorePath):  # the kept rows become the base object, chunks go
            if path.exists() or kept:
                write_jsonl_atomic(path, kept)
            for c in chunk_dir(path).iterdir():
                c.unlink(missing_ok=True)
        elif path.exists() or kept:
            write_jsonl_atomic(path, kept)
        return cls(path), kept

    def write(self, row: dict) -> None:
        """Append one row: a line of the local file, or one chunk object on a store (the
        trainer logs a row every ``log_every`` steps, so chunks stay few per run)."""
        if self._f is None:
            (chunk_dir(self.path) / f"{self._next_chunk:06d}.jsonl").write_bytes(dumps_line(row).encode())
            self._next_chunk += 1
            return
        self._f.write(dumps_line(row))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _append_text(path, text: str) -> None:
    """Append to a local file, or rewrite the object with the text added (a store)."""
    if isinstance(path, storage.StorePath):
        old = path.read_bytes() if path.exists() else b""
        path.write_bytes(old + text.encode())
        return
    with open(path, "a") as f:
        f.write(text)
