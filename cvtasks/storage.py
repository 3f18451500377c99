"""Read dataset files from local paths or any URI that pyarrow's filesystems understand (``s3://``, ``gs://``).

Cluster workers read shared storage through these helpers rather than the driver's disk.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs

from cvtasks.errors import DataFormatError


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the path inside it for a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


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
