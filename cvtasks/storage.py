"""Read dataset files from local paths or any URI that pyarrow's filesystems understand (``s3://``, ``gs://``).

Cluster workers read shared storage through these helpers rather than the driver's disk. One filesystem object per
bucket is kept for the life of the process (a Ray task's worker process reads a whole batch of files through it),
so reading thousands of small files reuses its connection pool instead of setting up a client per file
(``benchmarks/bench_s3.py`` measures the difference).
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from cvtasks.errors import DataFormatError

log = logging.getLogger(__name__)

#: Schemes whose paths inside the filesystem are ``bucket/key``: their filesystem objects are cached per bucket.
BUCKET_SCHEMES = ("s3", "gs", "gcs")
#: Files uploaded at once by :func:`upload_tree` (object stores serve many small requests in parallel).
UPLOAD_THREADS = 16
_LOCAL = pafs.LocalFileSystem()
_by_bucket: dict[str, pafs.FileSystem] = {}


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the path inside it for a local path or URI."""
    if "://" not in uri:
        return _LOCAL, os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme not in BUCKET_SCHEMES or "?" in rest:  # options in the query string make their own filesystem
        return pafs.FileSystem.from_uri(uri)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if bucket not in _by_bucket:
        _by_bucket[bucket] = pafs.FileSystem.from_uri(uri)[0]
    return _by_bucket[bucket], rest.rstrip("/")


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with forward slashes."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(base, *parts)


def split_last(uri: str) -> tuple[str, str]:
    """(parent, last part) of a local path or URI: ``s3://b/raycv/x`` -> (``s3://b/raycv``, ``x``).

    ``pathlib`` would collapse a URI's ``//`` (``s3:/b/raycv``), which is why URIs are split as text.
    """
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        parent, name = posixpath.split(rest.rstrip("/"))
        return f"{scheme}://{parent}", name
    parent, name = os.path.split(os.path.abspath(uri))
    return parent, name


def absolute(uri: str) -> str:
    """A local path made absolute (workers do not share the driver's working folder); URIs as they are."""
    return uri if "://" in uri else os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly inside directory ``uri``, sorted."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise DataFormatError(uri, "directory not found")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def read_bytes(uri: str) -> bytes:
    """The whole content of file ``uri``; a missing file raises DataFormatError naming it."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise DataFormatError(uri, f"cannot read file ({exc})") from exc


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if fs is _LOCAL:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_tree(local_dir: Path, uri: str, last: str | None = None) -> int:
    """Copy every file under ``local_dir`` to the same relative paths under ``uri``; returns the file count.

    ``last`` names a file (relative to ``local_dir``) uploaded only after all others, such as a marker that says
    the folder is complete: an interrupted upload leaves no marker, so the next run uploads again.
    """
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    final = Path(local_dir) / last if last else None
    first = [p for p in files if p != final]

    def put(path: Path) -> None:
        write_bytes(join(uri, *path.relative_to(local_dir).parts), path.read_bytes())

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for done, _ in enumerate(pool.map(put, first), start=1):
            if done % 2000 == 0:
                log.info("uploaded %d / %d files to %s", done, len(first), uri)
    if final is not None and final.is_file():
        put(final)
    return len(files)
