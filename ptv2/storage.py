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
import socket
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pyarrow.fs as pafs

from ptv2.errors import first_line

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(OSError):
    """A storage location that cannot be used; the message names the URI."""


def is_uri(location: str) -> bool:
    """True for `scheme://…` locations (object stores), False for plain paths."""
    return bool(_SCHEME.match(str(location))) and not str(location).startswith("file://")


# pyarrow reads S3 credentials from a URI's user info or these query options; a location is
# printed, logged as an MLflow parameter and tagged, so it must never carry them
SECRET_OPTIONS = frozenset({"access_key", "secret_key", "session_token"})


def check_uri(location: str) -> str:
    """`location` unchanged, or StorageError when it is an object-store URI carrying credentials."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    options = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if "@" in parts.netloc or options & SECRET_OPTIONS:
        shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        raise StorageError(
            f"{shown}: the URI carries credentials, which would be printed, logged and tagged with the job; "
            "give them to every node the standard way instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "an instance role, or the provider's credentials file)"
        )
    return location


_USERINFO = re.compile(r"(//)[^/@\s]*@")
_SECRET_VALUE = re.compile(r"(?i)([?&](?:" + "|".join(sorted(SECRET_OPTIONS)) + r")=)[^&\s]*")


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it masked (user info, secret ?options)."""
    return _SECRET_VALUE.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def normalize(location: str | Path) -> str:
    """A URI as given (without a trailing slash, its ?options kept), or an absolute local path
    (`file://` and `~` resolved). URIs with credentials are refused (`check_uri`)."""
    location = str(location)
    if is_uri(location):
        parts = urlsplit(check_uri(location))
        return urlunsplit(parts._replace(path=parts.path.rstrip("/"), fragment=""))
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def join(location: str, *parts: str) -> str:
    """`location` with path components appended (a URI's ?options stay at its end)."""
    base = normalize(location)
    if not is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    split = urlsplit(base)
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])))


def basename(location: str) -> str:
    """The last path component of a path or URI (a URI's ?options excluded)."""
    path = urlsplit(location).path if is_uri(location) else str(location)
    return path.rstrip("/").rsplit("/", 1)[-1]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location."""
    location = normalize(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with the reason
        raise StorageError(f"{location}: cannot open this storage: {first_line(e, 200)}") from e


def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except Exception as e:
        raise StorageError(f"{location}: {first_line(e, 200)}") from e


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
    """Write a (small) file whole: a reader finds the old content or the new, never a part (an
    object store's PUT is atomic; a local or shared filesystem gets a temporary file renamed)."""
    fs, path = resolve(location)
    folder = path.rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)
    target = path if not isinstance(fs, pafs.LocalFileSystem) else f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    with fs.open_output_stream(target) as f:
        f.write(data)
    if target != path:
        fs.move(target, path)


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
    system's temporary folder). Nothing that must outlive the process may stay only here.

    The folder is named `<prefix><owner>-<pid>-…`, the owner being this host's boot and PID
    namespace (`process_owner`). Folders left by dead processes of the same owner are removed;
    any other folder is left alone: $PTV2_SCRATCH may be a folder several machines or containers
    share, where a pid means another process (or nothing) on the host that wrote it."""
    root = Path(os.environ.get("PTV2_SCRATCH") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    owner = process_owner()
    for old in root.glob(f"{prefix}{owner}-[0-9]*-*"):
        pid = old.name.removeprefix(f"{prefix}{owner}-").split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner}-{os.getpid()}-", dir=root))


def process_owner() -> str:
    """Who can tell whether a pid is alive: this boot of this host, in this PID namespace
    (containers on one host share the boot id, not the namespace), as 12 hex digits."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
    target = cache_root / key / basename(location)
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
