"""The agent's Unix socket: a private folder, a stale file replaced, a live one left alone.

SPEC §8: the socket has mode 0600 inside a folder only its owner can enter, and a live
socket of another agent is never removed. gRPC's own bind silently replaces whatever file
is at the path and creates the socket with the process umask (DEPENDENCIES.md), so the
agent claims the path first:

1. the folder is created with mode 0700 if missing; an existing one must belong to this
   user and be closed to everyone else, or the agent refuses to start;
2. an exclusive lock on ``PATH.lock`` in that folder is held for the agent's life, so two
   agents starting at once cannot both pass the next step;
3. a file at the path is probed: a socket that accepts a connection belongs to a live
   server and is left alone (the agent refuses to start); a socket that refuses is a
   crashed agent's and is removed; anything that is not a socket is never touched.

After gRPC binds, `SocketClaim.bound` sets mode 0600. gRPC removes the socket file itself
when the server stops (measured with grpcio 1.85), whoever's it is by then; the lock is what
keeps another agent from being there. `SocketClaim.release` removes the socket if a failed
start left it, and drops the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from dmc.errors import FailedPrecondition, InvalidArgument

__all__ = ["SOCKET_MODE", "SocketClaim", "claim_socket"]

_log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
FOLDER_MODE = 0o700
# sun_path holds 108 bytes on Linux, the last one a NUL.
_MAX_PATH_BYTES = 107
_PROBE_TIMEOUT_SECONDS = 1.0


class SocketClaim:
    """The right to serve on one socket path, held until `release`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._inode: int | None = None

    @property
    def target(self) -> str:
        """The path as a gRPC address."""
        return f"unix:{self.path}"

    def bound(self) -> None:
        """Call after the server bound the path: restrict it to this user (SPEC §8)."""
        os.chmod(self.path, SOCKET_MODE)
        self._inode = self.path.lstat().st_ino

    def release(self) -> None:
        """Remove the socket if it is still ours, and drop the lock."""
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.path.lstat().st_ino == self._inode:
                    self.path.unlink()
            self._inode = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def claim_socket(path: str | os.PathLike[str]) -> SocketClaim:
    """Prepare ``path`` for the agent's socket, or raise saying why it cannot serve there.

    Raises `InvalidArgument` for a path too long for a Unix socket and `FailedPrecondition`
    for a folder others can enter, a live server at the path, or a file that is no socket.
    """
    socket_path = Path(path).absolute()
    if len(os.fsencode(socket_path)) > _MAX_PATH_BYTES:
        raise InvalidArgument(
            f"socket path {socket_path} is longer than {_MAX_PATH_BYTES} bytes, "
            "the limit of a Unix socket address"
        )

    _private_folder(socket_path.parent)
    lock_fd = _lock(socket_path)
    try:
        _clear_stale_socket(socket_path)
    except BaseException:
        os.close(lock_fd)
        raise
    return SocketClaim(socket_path, lock_fd)


def _private_folder(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(mode=FOLDER_MODE, parents=True)
        _log.info("created socket folder %s (mode 0700)", folder)
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise FailedPrecondition(f"{folder} is not a folder")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        # SPEC §8: only the agent's user may enter the folder that holds the socket.
        raise FailedPrecondition(
            f"socket folder {folder} (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):04o}) is open to other users; put the socket in a "
            f"folder of uid {os.geteuid()} with mode 0700"
        )


def _lock(socket_path: Path) -> int:
    lock_path = socket_path.with_name(socket_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SOCKET_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"another dmc agent holds {lock_path}: it is serving on {socket_path}"
        ) from None
    return fd


def _clear_stale_socket(socket_path: Path) -> None:
    try:
        info = socket_path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FailedPrecondition(f"{socket_path} exists and is not a socket; not replacing it")
    if _accepts_connections(socket_path):
        raise FailedPrecondition(
            f"a server is listening on {socket_path}; not replacing a live socket"
        )
    socket_path.unlink(missing_ok=True)
    _log.info("removed stale socket %s (nothing was listening on it)", socket_path)


def _accepts_connections(socket_path: Path) -> bool:
    """Whether a server listens on the socket; `False` only when the kernel refuses."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT_SECONDS)
        try:
            probe.connect(os.fspath(socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            # A full backlog or a timeout means someone is there: keep our hands off.
            return True
    return True
