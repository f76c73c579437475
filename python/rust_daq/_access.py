"""Who may talk to a daemon and where it may write: the daemon's local token file and the
validation of recording names from the wire. One implementation, used by the daemon
(:mod:`rust_daq.daemon`) and its clients (:mod:`rust_daq.remote`, the CLI).

**A token always.** A daemon started without a token generates one
(:func:`secrets.token_urlsafe`) and writes it to a file only its own user can read:
``$XDG_RUNTIME_DIR/rust-daq/daemon-<port>.token`` (else ``~/.rust-daq/``), directory mode
0700, file mode 0600, created with ``O_EXCL | O_NOFOLLOW`` and removed when the daemon
stops. A client on a loopback URL without a token reads that file
(:func:`local_token`); a process of another user cannot, so its calls are refused.

**Recording names.** ``start_recording`` over the wire names a file, never a path: one
component, created directly in the daemon's data directory (resolved once, at start, to an
absolute real path). No separators at all, so no ``..``, no absolute path and no symlinked
directory can take the file elsewhere; no control characters; an HDF5 suffix; a name that
exists (a symlink included) is refused.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._errors import AccessError, RecordingNameError

__all__ = [
    "RECORDING_SUFFIXES",
    "AccessError",
    "RecordingNameError",
    "check_compression",
    "check_metadata",
    "is_loopback",
    "local_token",
    "new_token",
    "read_token_file",
    "recording_path",
    "remove_token_file",
    "resolve_data_dir",
    "shown",
    "token_dirs",
    "write_token_file",
]

#: The suffixes a recording's file name may have (case-insensitive).
RECORDING_SUFFIXES = (".h5", ".hdf5", ".nxs")
NAME_MAX = 255  # bytes of any name from a config or the wire, as file systems allow
_METADATA_MAX = 64 * 1024  # bytes of JSON: the writer gets it as one argument (argv ≤ 128 KiB)
_TOKEN_MAX = 4096


def shown(value: Any, limit: int = 100) -> str:
    """``repr(value)``, cut to about `limit` characters: what an error message echoes of a
    client's input (a 100 kB name must not come back whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}… ({size:,} chars)"


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- the local token ------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_dirs() -> list[Path]:
    """Where a daemon's token file may be, in order: ``$XDG_RUNTIME_DIR/rust-daq`` (when
    set to an absolute path), ``~/.rust-daq``."""
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        dirs.append(Path(runtime) / "rust-daq")
    try:
        dirs.append(Path.home() / ".rust-daq")
    except RuntimeError:  # no home directory known
        pass
    return dirs


def _token_name(port: int) -> str:
    return f"daemon-{int(port)}.token"


def _private_dir(path: Path, create: bool) -> int:
    """An fd of directory `path`, checked to be ours and closed to everyone else (mode 0700;
    tightened if it is ours but looser). Raises AccessError otherwise, FileNotFoundError if
    it does not exist and `create` is false."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise AccessError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            if not create:
                raise AccessError(f"{path} can be read by others (mode {stat.S_IMODE(st.st_mode):o})")
            os.fchmod(fd, 0o700)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _sweep(dfd: int) -> None:
    """Removes the token files that daemons of this user killed (SIGKILL) left behind: those
    whose daemon's pid (their second line) is no longer alive."""
    for entry in os.listdir(dfd):
        if not (entry.startswith("daemon-") and entry.endswith(".token")):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                lines = os.read(fd, _TOKEN_MAX).split(b"\n")
            finally:
                os.close(fd)
            pid = int(lines[1]) if len(lines) > 1 and lines[1].strip().isdigit() else 0
            if pid > 0:
                os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(entry, dir_fd=dfd)
            except OSError:
                pass
        except OSError:  # alive (maybe not ours: EPERM), or unreadable: leave it
            pass


def write_token_file(port: int, token: str) -> Path:
    """Writes `token` (and this process's pid) for the daemon on `port` where only this user
    can read it; returns the file. A file there for the same port can only be stale (the
    port is this daemon's, and the directory is this user's alone): it is replaced. Files
    of other ports whose daemon is gone are removed."""
    errors = []
    for directory in token_dirs():
        try:
            dfd = _private_dir(directory, create=True)
        except OSError as e:
            errors.append(f"{directory}: {e.strerror or e}")
            continue
        name = _token_name(port)
        try:
            _sweep(dfd)
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise AccessError(f"{directory / name} exists and is not a regular file")
                os.unlink(name, dir_fd=dfd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                os.write(fd, f"{token}\n{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            return directory / name
        except OSError as e:
            errors.append(f"{directory / name}: {e.strerror or e}")
        finally:
            os.close(dfd)
    raise AccessError("cannot write the daemon's token file: " + "; ".join(errors or ["no directory"]))


def remove_token_file(path: Path, token: str) -> None:
    """Removes the token file at `path` if it still holds `token` (not a later daemon's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            first = os.read(fd, _TOKEN_MAX).split(b"\n", 1)[0].strip()
            ours = stat.S_ISREG(os.fstat(fd).st_mode) and first == token.encode()
        finally:
            os.close(fd)
        if ours:
            os.unlink(path)
    except OSError:
        pass


def read_token_path(path: Path) -> str | None:
    """The token in `path` if it is a private regular file of this user (and its directory
    too); None otherwise (missing, someone else's, readable by others, a symlink)."""
    try:
        dfd = _private_dir(path.parent, create=False)
    except OSError:
        return None
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            return None
        first = os.read(fd, _TOKEN_MAX).split(b"\n", 1)[0]  # then the daemon's pid
        token = first.decode("ascii", errors="replace").strip()
        return token or None
    finally:
        os.close(fd)


def read_token_file(port: int) -> str | None:
    """The token of this user's daemon on `port` of this machine, if it wrote one."""
    for directory in token_dirs():
        token = read_token_path(directory / _token_name(port))
        if token is not None:
            return token
    return None


def local_token(url: str) -> str | None:
    """For a loopback daemon URL (``grpc://127.0.0.1:8815``): the token its daemon wrote for
    this user, if any. None for other hosts."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if host is None or port is None or not is_loopback(host):
        return None
    return read_token_file(port)


# -- where recordings go ------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The absolute real path of `data_dir` (None: the working directory), which must be an
    existing directory. Resolved once, when the daemon starts."""
    path = Path(os.path.realpath(os.fspath(data_dir) if data_dir is not None else os.getcwd()))
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise RecordingNameError(f"the data directory {path} {what}")
    return path


#: What a name (stream, instrument, recording, metadata key) may not hold: control, format,
#: surrogate, private-use and unassigned characters, line and paragraph separators. One rule
#: for every name that comes from a config or the wire.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def control_char(text: str) -> str | None:
    """The first character of `text` no name may hold, or None."""
    for ch in text:
        if unicodedata.category(ch) in _NOT_IN_NAMES:
            return ch
    return None


def recording_path(data_dir: Path, name: Any) -> str:
    """The file `name` (from the wire) under `data_dir`, or RecordingNameError saying what is
    wrong with it. A name is one path component: a separator, ``..``, an absolute path, a
    control character or a name that exists (a symlink included) is refused; it ends in
    .h5, .hdf5 or .nxs."""
    allowed = ", ".join(RECORDING_SUFFIXES)
    if not isinstance(name, str) or not name:
        raise RecordingNameError(
            f'needs "file": a file name ({allowed}), created in the daemon\'s data directory'
        )
    bad = control_char(name)
    if bad is not None:
        raise RecordingNameError(f"file name {shown(name)} contains the control character {bad!r}")
    if name.startswith("/"):
        raise RecordingNameError(
            f"file {shown(name)}: absolute paths are refused; give a file name, it goes in the "
            "daemon's data directory"
        )
    if ".." in name.split("/"):
        raise RecordingNameError(f"file {shown(name)}: '..' is refused; give a file name")
    if "/" in name:
        raise RecordingNameError(
            f"file {shown(name)}: directories are refused; give a file name, it goes directly "
            "in the daemon's data directory"
        )
    if name in (".", ".."):
        raise RecordingNameError(f"file {shown(name)} is not a file name")
    if len(name.encode()) > NAME_MAX:
        raise RecordingNameError(f"file name {shown(name)} is longer than {NAME_MAX} bytes")
    if not name.lower().endswith(RECORDING_SUFFIXES):
        raise RecordingNameError(f"file name {shown(name)} must end in {allowed}")
    path = data_dir / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return str(path)
    if stat.S_ISLNK(st.st_mode):
        raise RecordingNameError(f"file {shown(name)} is a symbolic link in the data directory; refused")
    raise RecordingNameError(f"file {shown(name)} already exists in the data directory; choose another")


def check_metadata(metadata: Any) -> dict[str, Any]:
    """Metadata from the wire: a JSON object whose keys are names the writer can store (no
    control characters, no '/', not '.', '..' or 'json', at most 255 bytes) and whose values
    are any JSON, kept as data; at most 64 KiB. Returns it, or raises RecordingNameError."""
    import json

    if not isinstance(metadata, dict):
        raise RecordingNameError("metadata must be a JSON object")
    for key in metadata:
        bad = control_char(key) if isinstance(key, str) else None
        if not isinstance(key, str) or not key or bad is not None:
            what = f"the control character {bad!r}" if bad is not None else "no name"
            raise RecordingNameError(f"metadata key {shown(key)} has {what}")
        if len(key.encode()) > NAME_MAX:
            raise RecordingNameError(f"metadata key {shown(key)} is longer than {NAME_MAX} bytes")
        if "/" in key or key in (".", "..", "json"):
            raise RecordingNameError(
                f"metadata key {shown(key)}: keys name HDF5 datasets; no '/', '.', '..' or 'json'"
            )
    size = len(json.dumps(metadata, default=str))
    if size > _METADATA_MAX:
        raise RecordingNameError(f"metadata is {size:,} bytes of JSON; at most {_METADATA_MAX:,}")
    return metadata


_COMPRESSION = re.compile(r"[A-Za-z0-9_]{1,16}(:[0-9]{1,3})?")


def check_compression(compression: Any) -> str | None:
    """A compression name from the wire (``gzip``, ``gzip:4``, ``lzf``...), or None."""
    if compression is None:
        return None
    if not isinstance(compression, str) or not _COMPRESSION.fullmatch(compression):
        raise RecordingNameError(
            f"compression must be a filter name such as gzip, gzip:4 or lzf, got {shown(compression)}"
        )
    return compression
