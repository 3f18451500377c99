"""``raycv data download`` against a real HTTP server on 127.0.0.1 serving archives built here (no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from cvtasks import storage
from cvtasks.catalog import D2L_DATA_URL, Download
from cvtasks.demo import cifar as cifar_demo
from cvtasks.demo import hotdog as hotdog_demo
from cvtasks.demo import voc as voc_demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import cifar, imagefolder, voc
from cvtasks.tasks import all_datasets, task_class
from pipelines import cli
from pipelines import download as dl
from pipelines import weights as pw


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET with single open-ended ``Range: bytes=N-`` support (the stdlib's SimpleHTTPRequestHandler has none)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: FileServer = self.server  # type: ignore[assignment]
        range_header = self.headers.get("Range")
        server.requests.append((self.path, range_header))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


class FileServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def tar_of(folder: Path, arcname: str, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        tf.add(folder, arcname=arcname)
    return buf.getvalue()


def zip_of(base: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted((base / top).rglob("*")):
            zf.write(path, path.relative_to(base).as_posix())
    return buf.getvalue()


def serve(server: FileServer, monkeypatch, name: str, filename: str, data: bytes, folder: str,
          digest: str | None = None) -> None:
    """Serve ``data`` as ``filename`` and point dataset ``name`` at it (with ``digest``, default its real SHA-1)."""
    server.files[filename] = data
    point(monkeypatch, name, Download(server.url + filename, "sha1", digest or sha1(data), folder))


def point(monkeypatch, name: str, source: Download) -> None:
    """Make registered dataset ``name`` download from ``source`` for this test."""
    task = next(task_class(t) for t, d in all_datasets() if d.name == name)
    monkeypatch.setattr(task, "datasets", tuple(dataclasses.replace(d, download=source) if d.name == name else d
                                                for d in task.datasets))


@pytest.fixture
def hotdog_zip(tmp_path) -> bytes:
    src = tmp_path / "src"
    hotdog_demo.write(src, seed=0, n_train_per_class=2, n_test_per_class=1)
    return zip_of(src, "hotdog")


# --- download, extract, idempotency --------------------------------------------------------------------------------

def test_cifar_tarball_downloads_and_reads(server, monkeypatch, tmp_path):
    src = tmp_path / "src"
    cifar_demo.write(src, seed=0, n_train=10, n_test=4)
    data = tar_of(src / "cifar-10-batches-py", "cifar-10-batches-py")
    serve(server, monkeypatch, "cifar10", "cifar-10-python.tar.gz", data, "cifar-10-batches-py")
    calls = []
    root = tmp_path / "real"

    path = dl.download("cifar10", root, progress=lambda done, total: calls.append((done, total)))

    assert path == root / "cifar-10-batches-py"
    assert len(cifar.index(str(root), "train")) == 10 and len(cifar.index(str(root), "val")) == 4
    assert calls[-1] == (len(data), len(data))
    assert not (root / dl.DOWNLOADS_DIR / "cifar-10-python.tar.gz").exists()  # archive removed after extraction
    assert sorted(p.name for p in root.iterdir()) == [dl.DOWNLOADS_DIR, "cifar-10-batches-py"]  # no staging left


def test_second_call_does_nothing(server, monkeypatch, tmp_path, hotdog_zip):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    root = tmp_path / "real"
    first = dl.download("hotdog", root)
    assert len(imagefolder.index(str(root), "hotdog", "train")) == 4
    server.files.clear()  # a second download attempt would now fail with HTTP 404

    assert dl.download("hotdog", root) == first
    assert len(server.requests) == 1


def test_voc_tar_lands_where_the_reader_looks(server, monkeypatch, tmp_path):
    src = tmp_path / "src"
    voc_demo.write(src, seed=0, n_train=3, n_val=2, min_side=40, max_side=60)
    data = tar_of(src / "VOCdevkit", "VOCdevkit", mode="w")
    serve(server, monkeypatch, "voc", "VOCtrainval_11-May-2012.tar", data, "VOCdevkit/VOC2012")
    root = tmp_path / "real"

    assert dl.download("voc", root) == root / "VOCdevkit" / "VOC2012"
    assert len(voc.index(str(root), "train")) == 3 and len(voc.index(str(root), "val")) == 2


def test_mirror_url_replaces_the_original(server, monkeypatch, tmp_path, hotdog_zip):
    server.files["hotdog.zip"] = hotdog_zip
    unreachable = "http://127.0.0.1:9/hotdog.zip"
    point(monkeypatch, "hotdog", Download(unreachable, "sha1", sha1(hotdog_zip), "hotdog"))
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    assert (dl.download("hotdog", tmp_path) / "train").is_dir()


def test_cli_downloads_through_the_mirror(server, monkeypatch, tmp_path, hotdog_zip, capsys):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    assert cli.main(["data", "download", "hotdog", "--root", str(tmp_path)]) == 0
    assert f"hotdog: ready at {tmp_path / 'hotdog'}" in capsys.readouterr().out


# --- resume -------------------------------------------------------------------------------------------------------

def test_truncated_part_file_is_resumed_with_a_range_request(server, monkeypatch, tmp_path, hotdog_zip):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    half = len(hotdog_zip) // 2
    part = tmp_path / dl.DOWNLOADS_DIR / "hotdog.zip.part"
    part.parent.mkdir()
    part.write_bytes(hotdog_zip[:half])

    dl.download("hotdog", tmp_path)

    assert server.requests == [("/hotdog.zip", f"bytes={half}-")]
    assert (tmp_path / "hotdog" / "test").is_dir()


def test_complete_part_file_is_verified_without_refetching(server, monkeypatch, tmp_path, hotdog_zip):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    part = tmp_path / dl.DOWNLOADS_DIR / "hotdog.zip.part"
    part.parent.mkdir()
    part.write_bytes(hotdog_zip)
    dl.download("hotdog", tmp_path)  # the server answers 416 (nothing past the end)
    assert (tmp_path / "hotdog" / "train").is_dir()


def test_server_without_range_support_restarts_from_zero(server, monkeypatch, tmp_path, hotdog_zip):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    server.honour_range = False
    part = tmp_path / dl.DOWNLOADS_DIR / "hotdog.zip.part"
    part.parent.mkdir()
    part.write_bytes(b"stale bytes from another file")
    dl.download("hotdog", tmp_path)
    assert (tmp_path / "hotdog" / "train").is_dir()


# --- errors -------------------------------------------------------------------------------------------------------

def test_checksum_mismatch_names_the_file_and_both_hashes_and_removes_it(server, monkeypatch, tmp_path, hotdog_zip):
    wrong = "0" * 40
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog", digest=wrong)
    with pytest.raises(DataFormatError) as err:
        dl.download("hotdog", tmp_path)
    message = str(err.value)
    assert "hotdog.zip" in message and wrong in message and sha1(hotdog_zip) in message
    assert list((tmp_path / dl.DOWNLOADS_DIR).iterdir()) == []
    assert not (tmp_path / "hotdog").exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "hotdog/../../evil.txt"])
def test_path_traversal_members_are_rejected(server, monkeypatch, tmp_path, member):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hotdog/train/a/x.txt", b"fine")
        zf.writestr(zipfile.ZipInfo(member), b"evil")  # ZipInfo keeps the name as given
    serve(server, monkeypatch, "hotdog", "hotdog.zip", buf.getvalue(), "hotdog")
    root = tmp_path / "root"
    with pytest.raises(DataFormatError, match="outside the target folder"):
        dl.download("hotdog", root)
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == [dl.DOWNLOADS_DIR]  # nothing extracted, no staging left


def test_tar_links_are_rejected(server, monkeypatch, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("VOCdevkit/VOC2012/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tf.addfile(link)
    serve(server, monkeypatch, "voc", "VOCtrainval_11-May-2012.tar", buf.getvalue(), "VOCdevkit/VOC2012")
    with pytest.raises(DataFormatError, match="link or special file"):
        dl.download("voc", tmp_path)


def test_archive_without_the_expected_folder_is_an_error(server, monkeypatch, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("something-else/x.txt", b"x")
    serve(server, monkeypatch, "banana", "banana-detection.zip", buf.getvalue(), "banana-detection")
    with pytest.raises(DataFormatError, match="no banana-detection/ folder"):
        dl.download("banana", tmp_path)
    assert not (tmp_path / "banana-detection").exists()


def test_datasets_are_named_after_their_tasks_and_voc2012_still_works():
    sources = real_sources()
    assert set(sources) == {"cifar10", "hotdog", "banana", "voc"}
    assert dl.source_named("voc2012") == ("voc", sources["voc"])
    with pytest.raises(ValueError, match="hotdog-source.*demo data only"):
        dl.source_named("hotdog-source")


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known: cifar10, hotdog, hotdog-source, banana, voc"):
        dl.download("imagenet", tmp_path)


def test_http_error_and_refused_connection_are_clear(server, monkeypatch, tmp_path):
    point(monkeypatch, "hotdog", Download(server.url + "hotdog.zip", "sha1", "0" * 40, "hotdog"))
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download("hotdog", tmp_path)
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(dl.DownloadError, match="cannot connect"):
        dl.download("hotdog", tmp_path, base_url=f"http://127.0.0.1:{port}/")


def test_existing_folder_not_from_a_download_is_left_alone(server, monkeypatch, tmp_path, hotdog_zip):
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    (tmp_path / "hotdog").mkdir()
    with pytest.raises(dl.DownloadError, match="not completed by raycv data download"):
        dl.download("hotdog", tmp_path)
    assert server.requests == []


def real_sources() -> dict[str, Download]:
    return {d.name: d.download for _, d in all_datasets() if d.download}


def test_the_tasks_declare_the_published_checksums():
    sources = real_sources()
    assert sources["hotdog"].digest == "fba480ffa8aa7e0febbb511d181409f899b9baa5"
    assert sources["banana"].digest == "5de26c8fce5ccdea9f91267273464dc968d20d72"
    assert sources["voc"].digest == "4e443f8a2eca6b1dac8a6c57641b67dd40621a49"
    assert sources["voc"].url == D2L_DATA_URL + "VOCtrainval_11-May-2012.tar"
    assert all(len(s.digest) == hashlib.new(s.algorithm).digest_size * 2 for s in sources.values())


# --- storage URIs -------------------------------------------------------------------------------------------------

def test_cli_downloads_to_s3_through_the_local_cache(server, monkeypatch, tmp_path, hotdog_zip, s3_server, capsys):
    """``raycv data download NAME --root s3://...``: fetched and unpacked in the local cache, uploaded marker last;
    the reader then reads it from S3, and a second call finds the marker and does nothing."""
    serve(server, monkeypatch, "hotdog", "hotdog.zip", hotdog_zip, "hotdog")
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    monkeypatch.setenv("RAYCV_CACHE", str(tmp_path / "cache"))
    root = s3_server.uri("downloaded")
    assert cli.main(["data", "download", "hotdog", "--root", root]) == 0
    assert f"hotdog: ready at {root}/hotdog" in capsys.readouterr().out
    assert storage.exists(f"{root}/hotdog/{dl.MARKER}")
    assert len(imagefolder.index(root, "hotdog", "train")) == len(imagefolder.index(str(tmp_path / "cache" / "hotdog"),
                                                                                     "hotdog", "train")) > 0
    requests = len(server.requests)
    assert cli.main(["data", "download", "hotdog", "--root", root]) == 0
    assert len(server.requests) == requests


# --- pretrained weights: downloaded once, on the driver ----------------------------------------------------------


class _TinyEntry:
    """Stands in for a torchvision weights entry whose file a test serves."""

    name = "IMAGENET1K_V1"

    def __init__(self, url: str) -> None:
        self.url = url


def _tiny_weights(data: bytes, digest_of: bytes | None = None) -> type:
    """A weights "enum" whose file name carries the SHA-256 prefix of ``digest_of`` (default: ``data``)."""
    prefix = hashlib.sha256(digest_of or data).hexdigest()[:8]
    return type("TinyWeights", (), {"DEFAULT": _TinyEntry(f"https://download.pytorch.org/models/tiny-{prefix}.pth")})


def _state_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    return buf.getvalue()


def test_imagenet_weights_download_once_into_the_hub_cache_with_the_hash_check(server, monkeypatch, tmp_path):
    data = _state_bytes()
    tiny = _tiny_weights(data)
    server.files[Path(tiny.DEFAULT.url).name] = data
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_URL_ENV, server.url)
    pw.fetch_imagenet(tiny)
    cached = tmp_path / "hub" / "checkpoints" / Path(tiny.DEFAULT.url).name
    assert cached.read_bytes() == data
    pw.fetch_imagenet(tiny)  # cached: no second download
    assert len(server.requests) == 1


def test_imagenet_weights_with_a_wrong_hash_are_refused_and_not_cached(server, monkeypatch, tmp_path):
    data = _state_bytes()
    tiny = _tiny_weights(data, digest_of=b"other bytes")
    server.files[Path(tiny.DEFAULT.url).name] = data
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_URL_ENV, server.url)
    with pytest.raises(DataFormatError, match="hash"):
        pw.fetch_imagenet(tiny)
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())


def test_imagenet_weights_offline_fail_in_one_line_with_the_alternatives(server, monkeypatch, tmp_path):
    tiny = _tiny_weights(b"never served")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv(pw.WEIGHTS_URL_ENV, server.url)  # answers 404, as a mirror without the file
    with pytest.raises(FileNotFoundError) as err:
        pw.fetch_imagenet(tiny)
    message = str(err.value)
    assert "\n" not in message and "not in the torch hub cache" in message and "model.weights=scratch" in message
