"""Run directories on object stores: a ``pathlib``-like path over fsspec for URLs.

``storage.path(p)`` is a ``pathlib.Path`` for a local path and a ``StorePath`` for a URL with a
scheme (``gs://``, ``s3://``, ``memory://``, ...; the store's fsspec package, e.g. ``gcsfs``, must
be installed). A ``StorePath`` offers the few operations run directories need (``/``, ``name``,
``parent``, ``exists``, ``is_dir``, ``iterdir``, ``read_bytes``/``read_text``, ``write_bytes``,
``unlink``, ``mkdir``), so ``scaling.files`` and the run readers take either.

What differs on a store (``scaling.files`` does it):

* Objects are written whole: ``write_json_atomic`` puts one object (a reader sees the old or the
  new one, never a torn file), where a local file is written to a temp file and renamed.
* Objects cannot be appended to: a JSONL file (the metrics) is a base object ``metrics.jsonl``
  plus numbered chunk objects ``metrics.jsonl.chunks/000001.jsonl``, ... that readers
  concatenate in order.

fsspec rather than ``etils.epath``: epath reaches gs:// and s3:// through fsspec (or TensorFlow)
but has no ``memory://``, the store the tests use. Orbax checkpoints take the URL string (orbax
writes gs:// natively through tensorstore). Standard library + fsspec.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Iterator, Union

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(p) -> bool:
    """True for a path with a scheme other than ``file://`` (an object store)."""
    return isinstance(p, StorePath) or (isinstance(p, str) and bool(_URL.match(p)) and not p.startswith("file://"))


def path(p) -> "Union[Path, StorePath]":
    """``StorePath`` for a URL, ``pathlib.Path`` otherwise (``file://`` stripped)."""
    if isinstance(p, (Path, StorePath)):
        return p
    p = str(p)
    if p.startswith("file://"):
        return Path(p[len("file://"):])
    return StorePath(p) if is_url(p) else Path(p)


class StorePath:
    """A location in an fsspec filesystem, addressed by URL (``scheme://bucket/key``)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.fs, self._key = fsspec.core.url_to_fs(self.url)

    # naming
    def __truediv__(self, part: str) -> "StorePath":
        return StorePath(f"{self.url}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StorePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StorePath) and other.url == self.url

    def __lt__(self, other: "StorePath") -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    @property
    def parent(self) -> "StorePath":
        scheme, _, rest = self.url.partition("://")
        head = posixpath.dirname(rest)
        return StorePath(f"{scheme}://{head}") if head else self

    def with_name(self, name: str) -> "StorePath":
        if self.parent == self:
            raise ValueError(f"{self.url} has no name to replace (a bucket root)")
        return self.parent / name

    # queries
    def _fresh(self) -> None:
        # gcsfs/s3fs cache listings without expiry: a reader polling a live run must see new objects
        self.fs.invalidate_cache(self._key)

    def exists(self) -> bool:
        self._fresh()
        return self.fs.exists(self._key)

    def is_dir(self) -> bool:
        self._fresh()
        return self.fs.isdir(self._key)

    def is_file(self) -> bool:
        return self.fs.isfile(self._key)

    def iterdir(self) -> Iterator["StorePath"]:
        if not self.is_dir():
            return iter(())
        return iter(self / posixpath.basename(k.rstrip("/")) for k in sorted(self.fs.ls(self._key, detail=False))
                    if k.rstrip("/") != self._key.rstrip("/"))

    # contents
    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self._key)
        except FileNotFoundError:
            raise
        except OSError as err:  # stores raise their own kinds; callers catch OSError
            raise FileNotFoundError(str(err)) from err

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Put the whole object (stores replace objects atomically)."""
        self.fs.pipe_file(self._key, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self._key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: a no-op (kept for the ``pathlib`` interface; some
        stores' ``makedirs`` would create a bucket from a mistyped URL)."""
