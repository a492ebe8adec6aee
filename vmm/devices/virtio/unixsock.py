"""Unix stream sockets the VMM listens on or connects to (virtio-console, virtio-vsock).

``UnixListener`` binds a path and removes it again on close, but only if the
file there is still the socket it bound.  A path that already exists is
refused unless it is a stale socket nobody listens on (connect(2) answers
ECONNREFUSED), which is replaced: a crashed run does not block the next one,
and no other file is ever deleted.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ...errors import DeviceError

#: sizeof(struct sockaddr_un.sun_path), including the terminating NUL.
UNIX_PATH_MAX = 108


def check_path(path: str, what: str) -> None:
    """DeviceError unless ``path`` fits a sockaddr_un."""
    if not path:
        raise DeviceError(f"{what}: empty socket path")
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise DeviceError(f"{what} {path!r}: longer than the {UNIX_PATH_MAX - 1} bytes a Unix socket path can have")


def _is_stale_socket(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


class UnixListener:
    """A non-blocking listening Unix stream socket at ``path``."""

    def __init__(self, path: str, what: str, backlog: int = 16) -> None:
        """``what`` names the socket in errors ("console socket"); attach prefixes the option."""
        check_path(path, what)
        self.path = path
        self.what = what
        if os.path.lexists(path):
            if not _is_stale_socket(path):
                raise DeviceError(f"{what} {path}: already exists (and is not a stale socket)")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            st = os.lstat(path)
            self._ident = (st.st_dev, st.st_ino)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise DeviceError(f"{what} {path}: cannot listen: {e.strerror or e}") from None
        self.sock = sock

    def accept(self) -> socket.socket | None:
        """The next waiting client (non-blocking), or None."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None
            raise
        conn.setblocking(False)
        return conn

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass


def connect_unix(path: str) -> socket.socket:
    """Connect to a listening Unix stream socket without blocking; raises OSError if nobody listens.

    connect(2) on a Unix stream socket completes at once or fails (a full
    backlog answers EAGAIN), so this never waits on the peer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
