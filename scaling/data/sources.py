"""Text sources as documents: ``DataConfig`` -> the train and held-out documents, in a fixed order.

Every text source (``stdlib``, ``packages``, ``local_text``, ``hf``, ``tfds``) is reduced here to
two ordered streams of documents (bytes) plus, where the files are known, a file list with
hashes. Both the in-memory path (``corpus.load``) and the shard writer (``shards.prepare``) read
documents only through ``documents(cfg)``, so the two serve the same tokens in the same order.

- ``stdlib``      the interpreter's standard library (tfds ``scaling_stdlib``, see builders)
- ``packages``    the Python sources and docs of the installed distributions this package
                  depends on (``data.packages`` to name others), deduplicated by content
- ``local_text``  a directory of text files, filtered by ``data.include`` / ``data.exclude``
- ``hf``          a Hugging Face dataset on local disk: a ``save_to_disk`` directory or
                  parquet / jsonl / json / arrow files (the hub is never contacted)
- ``tfds``        any prepared tfds dataset in array_record format
- ``tasks``       the built-in synthetic task suites ``data.tasks`` (``scaling.tasks``), each
                  example a line ``prompt + answer``; train and held-out examples never share a
                  prompt (the suites' fixed hash split)

The held-out split is the hash-ranked rule of ``builders.split_paths`` unless the dataset ships
a ``validation`` (or ``test``) split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata as md
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Optional

from scaling.config import ConfigError, DataConfig

TEXT_SOURCES = ("stdlib", "packages", "local_text", "hf", "tfds", "tasks")
PACKAGE_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt")
PACKAGE_MAX_FILE_BYTES = 1 << 20  # larger files are data tables, not prose or code
HF_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}


@dataclass(frozen=True)
class Documents:
    """The documents of one source. ``train()`` / ``validation()`` stream bytes in a fixed order;
    ``files`` lists ``{"path", "bytes", "sha256", "split"}`` when the source is a file set."""

    name: str
    train: Callable[[], Iterable[bytes]]
    validation: Callable[[], Iterable[bytes]]
    files: Optional[list] = None
    extra: dict = field(default_factory=dict)


def documents(cfg: DataConfig) -> Documents:
    """The documents ``cfg.source`` names; ConfigError naming the field for a missing path,
    dataset or column."""
    if cfg.source == "stdlib":
        return _tfds_local("stdlib", None, (), ())
    if cfg.source == "local_text":
        return _tfds_local("local_text", cfg.path, tuple(cfg.include), tuple(cfg.exclude))
    if cfg.source == "packages":
        return _packages(tuple(cfg.packages))
    if cfg.source == "hf":
        return _hf(cfg.path, cfg.text_feature)
    if cfg.source == "tfds":
        return _tfds(cfg.tfds_name, cfg.path, cfg.text_feature)
    if cfg.source == "tasks":
        return _tasks(tuple(cfg.tasks), cfg.task_examples)
    raise ConfigError(f"data.source: {cfg.source!r} is not a text source ({', '.join(TEXT_SOURCES)})")


def matches(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """``rel`` (a relative posix path) passes the globs: any ``include`` (all when none), no
    ``exclude``. Patterns are ``fnmatch`` patterns over the whole relative path (``*`` crosses
    ``/``), e.g. ``*.py`` or ``docs/*``."""
    if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, g) for g in exclude)


# --------------------------------------------------------------------------------------------
# stdlib and local_text (tfds builders, built once) and tfds
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _tfds_local(source: str, path: Optional[str], include: tuple, exclude: tuple) -> Documents:
    from scaling.data import builders

    if source == "stdlib":
        builder = builders.stdlib_builder()
        name = "stdlib-py{}.{}.{}".format(*sys.version_info[:3])
    else:
        builder = builders.local_text_builder(path, include, exclude)
        name = f"local_text:{path}" + (f"[include={','.join(include)}]" if include else "") + \
            (f"[exclude={','.join(exclude)}]" if exclude else "")
    # sorted by path so the stream does not depend on the record order tfds chose when writing
    splits = {s: sorted(builders.read_records(builder, s, ("path", "text"))) for s in ("train", "validation")}
    files = [{"path": p.decode() if isinstance(p, bytes) else p, "bytes": len(t),
              "sha256": hashlib.sha256(t).hexdigest(), "split": s} for s, rows in splits.items() for p, t in rows]
    return Documents(name, lambda: [t for _, t in splits["train"]], lambda: [t for _, t in splits["validation"]],
                     files)


@lru_cache(maxsize=4)
def _tfds(name: str, data_dir: Optional[str], feature: str) -> Documents:
    import tensorflow_datasets as tfds

    from scaling.data import builders

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several kinds (DatasetNotFoundError, registry errors)
        raise ConfigError(f"data.tfds_name: cannot find dataset {name!r} in data.path={data_dir!r} ({type(e).__name__})") from None
    if not builder.is_prepared():
        raise ConfigError(
            f"data.tfds_name: {name!r} is not prepared under data.path={data_dir!r}; prepare it there "
            "with file_format='array_record' (see docs/data.md)"
        )
    info = builder.info
    if feature not in info.features:
        raise ConfigError(f"data.text_feature: {name!r} has no feature {feature!r}; it has {', '.join(info.features)}")
    splits = list(info.splits)
    if "train" not in splits:
        raise ConfigError(f"data.tfds_name: {name!r} has no 'train' split (splits: {', '.join(splits)})")
    try:
        train = builders.read_split(builder, "train", feature)
        held = next((s for s in ("validation", "test") if s in splits), None)
        if held is not None:
            eval_ = builders.read_split(builder, held, feature)
        else:  # no held-out split shipped: apply our fixed hash-ranked rule to the training records
            parts = builders.split_documents([(str(i), t) for i, t in enumerate(train)])
            train, eval_ = [t for _, t in parts["train"]], [t for _, t in parts["validation"]]
    except ConfigError:
        raise
    except (NotImplementedError, ValueError):  # tfds: no random-access (array_record) files
        raise ConfigError(
            f"data.tfds_name: {name!r} must be prepared with file_format='array_record' for random access"
        ) from None
    return Documents(f"tfds:{name}", lambda: train, lambda: eval_)


@lru_cache(maxsize=4)
def _tasks(suites: tuple[str, ...], n: int) -> Documents:
    from scaling import tasks

    # held out: a tenth as many examples as trained on (at least 500), from the eval split
    train = [d for s in suites for d in tasks.training_text(s, n)]
    held = [tasks.held_out_text(s, max(500, n // 10)) for s in suites]
    return Documents("tasks:" + "+".join(suites), lambda: train, lambda: held,
                     extra={"tasks": list(suites), "task_examples": n})


# --------------------------------------------------------------------------------------------
# packages: the installed dependency closure's sources and docs
# --------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(root: str = "scaling") -> list[str]:
    """Normalised names of the installed distributions ``root`` needs (its requirements without
    extras, recursively), ``root`` itself left out. Sorted."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        key = _norm(name)
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(key)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    seen.discard(_norm(root))
    return sorted(seen)


def package_files(packages: tuple[str, ...] = ()) -> list[dict]:
    """The ``packages`` corpus's files: ``{"path": "DIST/relpath", "abspath", "bytes", "sha256",
    "dist", "version"}`` for every ``PACKAGE_SUFFIXES`` file of each distribution (default: the
    dependency closure of this package) that is UTF-8 text without NUL and at most
    ``PACKAGE_MAX_FILE_BYTES``; a file whose content was already seen is left out (first in
    path order kept). Sorted by path."""
    names = list(packages) or dependency_closure()
    rows = []
    for name in names:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise ConfigError(f"data.packages: {name!r} is not installed; name installed distributions") from None
        for f in dist.files or []:
            rel = str(f)
            if not rel.endswith(PACKAGE_SUFFIXES) or "__pycache__" in rel or rel.startswith(".."):
                continue
            p = Path(f.locate())
            try:
                st = p.stat()
            except OSError:
                continue
            if not st.st_size or st.st_size > PACKAGE_MAX_FILE_BYTES:
                continue
            rows.append({"path": f"{_norm(dist.metadata['Name'])}/{rel}", "abspath": str(p), "bytes": st.st_size,
                         "dist": _norm(dist.metadata["Name"]), "version": dist.version})
    rows.sort(key=lambda r: r["path"])
    out, seen = [], set()
    for r in rows:
        data = Path(r["abspath"]).read_bytes()
        if b"\x00" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        h = hashlib.sha256(data).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        out.append({**r, "bytes": len(data), "sha256": h})
    return out


@lru_cache(maxsize=2)
def _packages(packages: tuple[str, ...]) -> Documents:
    from scaling.data import builders

    files = package_files(packages)
    if not files:
        raise ConfigError(f"data.packages: no text files found in {', '.join(packages) or 'the dependency closure'}")
    held = builders.split_paths([(r["path"], r["bytes"]) for r in files])
    for r in files:
        r["split"] = "validation" if r["path"] in held else "train"

    def read(split):
        return lambda: (Path(r["abspath"]).read_bytes() for r in files if r["split"] == split)

    dists = sorted({(r["dist"], r["version"]) for r in files})
    manifest = [{k: r[k] for k in ("path", "bytes", "sha256", "split")} for r in files]
    return Documents("packages", read("train"), read("validation"), manifest,
                     extra={"distributions": {d: v for d, v in dists}})


# --------------------------------------------------------------------------------------------
# hf: Hugging Face datasets on local disk
# --------------------------------------------------------------------------------------------


def _hf_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in HF_FILE_BUILDERS)


@lru_cache(maxsize=4)
def _hf(path: Optional[str], feature: str) -> Documents:
    # never reach for the hub: a cluster node or a laptop without network must not hang
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source: hf needs the 'datasets' package; pip install 'scaling[hf]'") from None
    from scaling.data import builders

    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"data.path: {path!r} does not exist; point it at a dataset saved with save_to_disk "
                          "or at parquet/jsonl/arrow files")
    saved = root.is_dir() and any((root / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(str(root))
        else:
            files = _hf_files(root)
            if not files:
                raise ConfigError(f"data.path: {path!r} holds no dataset (no save_to_disk files and no "
                                  f"{'/'.join(HF_FILE_BUILDERS)} files)")
            kinds = {HF_FILE_BUILDERS[f.suffix] for f in files}
            if len(kinds) > 1:
                raise ConfigError(f"data.path: {path!r} mixes file kinds ({', '.join(sorted(kinds))}); keep one kind")
            from scaling.data.builders import cache_dir

            ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train",
                                       cache_dir=str(cache_dir() / "hf"))
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"data.path: {path!r}: missing file {e.filename or e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.path: {path!r} has no 'train' split (splits: {', '.join(ds)})")
        train_ds = ds["train"]
        held_name = next((s for s in ("validation", "test") if s in ds), None)
        held_ds = ds[held_name] if held_name else None
    else:
        train_ds, held_ds = ds, None
    if feature not in train_ds.column_names:
        raise ConfigError(f"data.text_feature: {path!r} has no column {feature!r}; it has {', '.join(train_ds.column_names)}")

    def col(d) -> list[bytes]:  # a missing (null) text is no document, not the text "None"
        return [(t if isinstance(t, bytes) else str(t).encode("utf-8")) for t in d[feature] if t is not None]

    train = col(train_ds)
    if held_ds is not None:
        eval_ = col(held_ds)
    else:  # our fixed hash-ranked rule over row numbers
        parts = builders.split_documents([(str(i), t) for i, t in enumerate(train)])
        train, eval_ = [t for _, t in parts["train"]], [t for _, t in parts["validation"]]
    return Documents(f"hf:{path}", lambda: train, lambda: eval_)
