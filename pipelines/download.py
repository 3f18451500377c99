"""``raycv data download``: fetch a real dataset's archive, verify its checksum, unpack it where the readers look.

Under the download root::

    .downloads/<archive>.part     while downloading; an interrupted download resumes with an HTTP Range request
    <top folder>/                 the unpacked dataset (cifar-10-batches-py, hotdog, banana-detection, VOCdevkit)
    <top folder>/.raycv-download  written last: the archive's checksum, so a second call returns at once

An archive is unpacked into a staging folder next to its destination and moved into place only once complete, so
an interrupted extraction never leaves a half dataset that looks finished. The archive is deleted afterwards.

Archives come from the URLs their tasks declare (``Dataset.download``: d2l's data hub for hotdog, banana and VOC2012;
Toronto for CIFAR-10). A mirror holding the same files by name can stand in for all of them: ``base_url=`` or
``$RAYCV_DATA_URL``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from cvtasks.catalog import Download
from cvtasks.errors import DataFormatError
from cvtasks.tasks import all_datasets, dataset_named

log = logging.getLogger(__name__)

#: A mirror folder holding every archive under its file name; replaces each dataset's own URL when set.
MIRROR_ENV = "RAYCV_DATA_URL"
DOWNLOADS_DIR = ".downloads"
PART_SUFFIX = ".part"
MARKER = ".raycv-download"
STAGING_PREFIX = ".raycv-extract-"
CHUNK_BYTES = 1 << 20
PROGRESS_SECONDS = 1.0  # report progress at most this often (and once at the end)
TIMEOUT_SECONDS = 60.0  # per socket operation, not for the whole download
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416

Progress = Callable[[int, int | None], None]


def source_named(name: str) -> tuple[str, Download]:
    """(dataset name, where it downloads from) of a dataset some task declares, by name or alias."""
    dataset = dataset_named(name)
    if dataset.download is None:
        downloadable = ", ".join(d.name for _, d in all_datasets() if d.download)
        raise ValueError(f"dataset {dataset.name!r} has no download (it is demo data only); downloadable: "
                         f"{downloadable}")
    return dataset.name, dataset.download


class DownloadError(RuntimeError):
    """The archive could not be fetched (network, HTTP status) or put in place."""


def download(name: str, root: str | Path, progress: Progress | None = None, base_url: str | None = None) -> Path:
    """Make dataset ``name`` ready under ``root``; returns its folder (e.g. ``root/VOCdevkit/VOC2012``).

    Does nothing when an earlier call finished (its marker holds the expected checksum). ``progress(done, total)``
    receives byte counts while downloading (``total`` None when the server does not say).
    """
    name, source = source_named(name)
    root = Path(root)
    target, marker = root / source.folder, root / source.top / MARKER
    if marker.is_file() and marker.read_text().strip() == source.digest:
        log.info("%s: already at %s", name, target)
        return target
    if (root / source.top).exists():
        raise DownloadError(f"{root / source.top} exists but was not completed by raycv data download; "
                            "remove it or download to another --root")
    mirror = base_url or os.environ.get(MIRROR_ENV)
    url = mirror.rstrip("/") + "/" + source.filename if mirror else source.url
    archive = root / DOWNLOADS_DIR / source.filename
    archive.parent.mkdir(parents=True, exist_ok=True)
    fetch(url, archive, source, progress)
    extract(archive, root, source)
    archive.unlink()
    log.info("%s: ready at %s", name, target)
    return target


def fetch(url: str, archive: Path, source: Download, progress: Progress | None = None) -> None:
    """Download ``url`` to ``archive`` through ``archive.part`` (resumed if present), then verify the checksum.

    A checksum mismatch removes the partial file and raises :class:`DataFormatError` naming both digests.
    """
    part = archive.with_name(archive.name + PART_SUFFIX)
    _stream(url, part, progress)
    actual = file_digest(part, source.algorithm)
    if actual != source.digest:
        part.unlink()
        raise DataFormatError(url, f"{source.algorithm} mismatch: expected {source.digest}, got {actual}; the corrupt "
                                   f"download was removed, run the command again to retry")
    part.replace(archive)


def _stream(url: str, part: Path, progress: Progress | None) -> None:
    """Append the rest of ``url`` to ``part``, asking only for the bytes past its current size."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == HTTP_RANGE_NOT_SATISFIABLE and done:
            log.info("%s: %s is already complete", url, part)  # verification decides
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason}); check the network, or set ${MIRROR_ENV} to a mirror "
                            "holding the archive") from exc
    with response:
        resumed = done and response.status == HTTP_PARTIAL_CONTENT
        if done and not resumed:
            log.info("%s: server ignored the range request, downloading from the start", url)
            done = 0
        elif resumed:
            log.info("%s: resuming at %.1f MB", url, done / 1e6)
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        last_report = time.monotonic()
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    done += len(chunk)
                    if progress and time.monotonic() - last_report >= PROGRESS_SECONDS:
                        progress(done, total)
                        last_report = time.monotonic()
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"{url}: connection lost after {done} bytes ({exc}); run the command again to "
                                "resume") from exc
    if total is not None and done < total:
        raise DownloadError(f"{url}: connection closed after {done} of {total} bytes; run the command again to resume")
    if progress:
        progress(done, total)


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: Path, root: Path, source: Download) -> None:
    """Unpack a zip or tar(.gz) archive and move its ``source.top`` folder into ``root``, marker included.

    Members that are absolute, climb out with ``..``, or are anything but plain files and folders (links,
    devices) are rejected before anything is written.
    """
    staging = root / (STAGING_PREFIX + source.top)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_member(archive, name)
                zf.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for member in members:
                    _check_member(archive, member.name)
                    if not (member.isfile() or member.isdir()):
                        raise DataFormatError(archive, f"member {member.name!r} is a link or special file")
                tf.extractall(staging, members=members, filter="data")
        else:
            raise DataFormatError(archive, "neither a zip nor a tar archive")
        unpacked = staging / source.top
        if not (staging / source.folder).is_dir():
            raise DataFormatError(archive, f"archive has no {source.folder}/ folder")
        (unpacked / MARKER).write_text(source.digest)
        unpacked.replace(root / source.top)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_member(archive: Path, name: str) -> None:
    """Reject a member name that would land outside the extraction folder."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or ".." in normalized.split("/") or (len(name) > 1 and name[1] == ":"):
        raise DataFormatError(archive, f"member {name!r} would be written outside the target folder; not extracting")
