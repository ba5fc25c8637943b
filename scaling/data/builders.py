"""tfds builders (array_record, no TensorFlow) for the text corpora the project ships with.

Two datasets of documents, each with a ``train`` and a ``validation`` split and features
``{"path": text, "text": text}``:

- ``scaling_stdlib``: the running interpreter's standard-library ``.py`` sources (tests,
  site-packages and ``__pycache__`` excluded). Exists on any machine with Python, no download.
- ``scaling_local_text``: every text file under a user directory (hidden and binary files
  skipped).

Both are written once into a cache directory (``$SCALING_DATA_DIR``, default
``~/.cache/scaling/tfds``) keyed by a fingerprint of the source files, and read back with
``builder.as_data_source()`` (random-access ``ArrayRecordDataSource``). tfds writes to an
``incomplete.*`` directory and renames it into place; an exclusive file lock around preparation
makes two processes building at once safe (the second waits, then reuses the first's result).

The held-out split is decided here, once, so it never changes: documents are ranked by the
SHA-256 of their relative path and the first ones in that order go to ``validation`` until they
hold at least ``EVAL_FRACTION`` of all bytes (at least one document, never all of them). A
single-file directory is cut in two at a line break at ~99% of its length.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

import tensorflow_datasets as tfds
from etils import epath

from scaling.config import ConfigError

EVAL_FRACTION = 0.01
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

Documents = list[tuple[str, bytes]]  # (relative path, raw bytes)


def cache_dir() -> Path:
    """Root of prepared datasets: ``$SCALING_DATA_DIR`` or ``~/.cache/scaling/tfds``."""
    env = os.environ.get("SCALING_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scaling" / "tfds"


# --------------------------------------------------------------------------------------------
# Source files
# --------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests and third-party packages."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out)


def text_files(root: Path) -> list[Path]:
    """Sorted regular non-hidden files under ``root`` (binary files are dropped later)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(p for p in out if p.is_file())


def fingerprint(files: list[Path], root: Path) -> str:
    """Cheap identity of a file set (relative paths, sizes, mtimes): changes when any file does."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_documents(files: list[Path], root: Path) -> Documents:
    """(relative path, bytes) of every file that is text (no NUL byte: NUL is the separator)."""
    docs = []
    for p in files:
        data = p.read_bytes()
        if data and b"\x00" not in data:
            docs.append((p.relative_to(root).as_posix(), data))
    return docs


def split_paths(sizes: list[tuple[str, int]], eval_fraction: float = EVAL_FRACTION) -> set[str]:
    """The held-out paths of a document set given ``(path, n_bytes)``: ranked by the SHA-256 of
    the path, the first ones go to validation until they hold ``eval_fraction`` of all bytes (at
    least one document, never all). Needs sizes only, so a large file set is split unread."""
    total = sum(n for _, n in sizes)
    ranked = sorted(sizes, key=lambda pn: hashlib.sha256(pn[0].encode()).hexdigest())
    held, n_held = set(), 0
    for path, n in ranked[:-1]:
        if n_held >= eval_fraction * total and held:
            break
        held.add(path)
        n_held += n
    return held


def split_documents(docs: Documents, eval_fraction: float = EVAL_FRACTION) -> dict[str, Documents]:
    """Fixed train/validation split (see module docstring). Order within a split: by path."""
    if len(docs) == 1:
        path, data = docs[0]
        cut = data.find(b"\n", int(len(data) * (1 - eval_fraction)))
        cut = int(len(data) * (1 - eval_fraction)) if cut < 0 else cut + 1
        return {"train": [(path + "#train", data[:cut])], "validation": [(path + "#validation", data[cut:])]}
    held = split_paths([(p, len(d)) for p, d in docs], eval_fraction)
    return {
        "train": sorted(pd for pd in docs if pd[0] not in held),
        "validation": sorted(pd for pd in docs if pd[0] in held),
    }


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


class _TextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents handed in by ``prepare`` (read from disk only when the dataset is built)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents with a fixed hash-ranked validation split."}

    documents: dict[str, Documents] | None = None

    # tfds looks for the builder's source through importlib_resources, which is not installed
    # (and not needed): point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"path": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        assert self.documents is not None, "prepare() sets the documents before building"
        return {name: self._generate_examples(docs) for name, docs in self.documents.items()}

    def _generate_examples(self, docs: Documents) -> Iterator[tuple[str, dict]]:
        for path, data in docs:
            yield path, {"path": path, "text": data}


class ScalingStdlib(_TextDocuments):
    """The Python standard library's .py sources (no tests), one document per file."""


class ScalingLocalText(_TextDocuments):
    """Every text file of a local directory, one document per file."""


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder_cls: type[_TextDocuments], data_dir: Path, documents: Callable[[], Documents]):
    """Build ``builder_cls`` into ``data_dir`` unless already there; return the builder.

    ``documents`` is called only when building. Safe under concurrent callers (file lock; tfds
    itself writes to a temporary directory and renames it into place).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir / f".{builder_cls.name}.lock"):
        builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
            builder.documents = split_documents(documents())
            tfds.disable_progress_bar()
            try:
                builder.download_and_prepare(
                    download_dir=str(data_dir / "downloads"),
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
                )
            finally:
                tfds.enable_progress_bar()
            builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    return builder


def stdlib_builder():
    """The prepared ``scaling_stdlib`` builder for this interpreter (built on first use)."""
    root, files = stdlib_root(), stdlib_files()
    v = sys.version_info
    key = f"py{v.major}.{v.minor}.{v.micro}-{fingerprint(files, root)}"
    return prepare(ScalingStdlib, cache_dir() / "stdlib" / key, lambda: read_documents(files, root))


def local_text_builder(path: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
    """The prepared ``scaling_local_text`` builder for directory ``path`` (only the files the
    ``include`` / ``exclude`` globs pass, see ``sources.matches``); ConfigError naming
    ``data.path`` when it is missing or holds no text."""
    from scaling.data.sources import matches

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path: {path!r} is not a directory; point it at a directory of text files")
    files = [p for p in text_files(root) if matches(p.relative_to(root).as_posix(), include, exclude)]
    if not files:
        what = " matching data.include/data.exclude" if include or exclude else ""
        raise ConfigError(f"data.path: {path!r} contains no files{what}; point it at a directory of text files")
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] + "-" + fingerprint(files, root)

    def docs() -> Documents:
        d = read_documents(files, root)
        if not d:
            raise ConfigError(f"data.path: {path!r} has no non-empty text files (binary files are skipped)")
        return d

    return prepare(ScalingLocalText, cache_dir() / "local_text" / key, docs)


def read_split(builder, split: str, feature: str = "text") -> list[bytes]:
    """All values of ``feature`` in ``split``, in record order, via the array_record data source."""
    return [r[0] for r in read_records(builder, split, (feature,))]


def read_records(builder, split: str, features: tuple[str, ...]) -> list[tuple[bytes, ...]]:
    """``features`` of every record of ``split`` (record order), decoded once, as bytes."""
    src = builder.as_data_source(split=split)
    out = []
    for i in range(len(src)):
        rec = src[i]
        out.append(tuple(_as_bytes(rec[f]) for f in features))
    return out


def _as_bytes(v) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    return bytes(v.item() if hasattr(v, "item") else v)
