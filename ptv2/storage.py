"""Storage that outlives a process: a local or shared-filesystem path, or an object-store URI.

A job's checkpoints and prompt artifacts go to one place every node reaches (`storage:` in the
spec): `/shared/ptv2`, `s3://bucket/prefix`, `gs://…`, or a local folder on one machine. Access
goes through `pyarrow.fs` (what Ray Train itself uses), so S3's endpoint and credentials come
from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, or the node's own role). Local disks are only scratch: `scratch()` gives a
private temporary folder per process, removed by its owner.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URI."""


def is_uri(location: str) -> bool:
    """True for `scheme://…` locations (object stores), False for plain paths."""
    return bool(_SCHEME.match(str(location))) and not str(location).startswith("file://")


def normalize(location: str | Path) -> str:
    """A URI as given, or an absolute local path (`file://` and `~` resolved)."""
    location = str(location)
    if is_uri(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def join(location: str, *parts: str) -> str:
    base = normalize(location)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location."""
    location = normalize(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with the reason
        raise StorageError(f"{location}: cannot open this storage: {str(e).splitlines()[0][:200]}") from e


def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except Exception as e:
        raise StorageError(f"{location}: {str(e).splitlines()[0][:200]}") from e


def exists(location: str) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return _info(location).type == pafs.FileType.File


def listdir(location: str) -> list[str]:
    """Names directly under `location` (empty when it does not exist)."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local_dir: str | Path, location: str) -> None:
    """Copy a local folder's files to `location` (merging with what is there)."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_file(local_file: str | Path, location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local_file), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, local_dir: str | Path) -> Path:
    """Copy every file under `location` into `local_dir` (created); returns `local_dir`."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"{location} does not exist")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def delete(location: str) -> None:
    """Remove a folder (or file) and everything under it; nothing when it is absent."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def scratch(prefix: str = "ptv2-") -> Path:
    """A new private local folder for work in progress, under $PTV2_SCRATCH (default: the
    system's temporary folder). Nothing that must outlive the process may stay only here."""
    root = Path(os.environ.get("PTV2_SCRATCH") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_copy(location: str, cache_root: Path) -> Path:
    """A local copy of a single remote file, kept under `cache_root` and fetched again only
    when the remote size or modification time changes. Local paths are returned as they are."""
    if not is_uri(location):
        return Path(location)
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{location} is not a file")
    key = hashlib.sha256(f"{location}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    target = cache_root / key / location.rsplit("/", 1)[-1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target.parent))
        try:
            fs, path = resolve(location)
            pafs.copy_files(path, str(tmp / target.name), source_filesystem=fs)
            os.replace(tmp / target.name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
