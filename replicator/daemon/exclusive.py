"""One process per port and per data directory (CONVENTIONS.md, "The daemon").

A second instance of a daemon must fail at start-up with one clear line, not
start quietly beside the first one:

- every gRPC server turns SO_REUSEPORT off (`replicator.api.server.EXCLUSIVE_PORT`),
  and the asyncio listeners (link, metrics) never set it, so a taken port is
  an error at bind time;
- `DirectoryLock` holds an exclusive `flock` on a file in the data directory
  for the life of the process (the kernel drops it when the process dies, so
  a crash leaves nothing to clean up); the file names the holder's pid.

A second site daemon for a site that already runs elsewhere (another data
directory, other ports) is refused by the peer, which keeps the connection of
the instance it already has a live session with (see `Link._handshake`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


class DirectoryLock:
    def __init__(self, directory: Path, file_name: str, what: str) -> None:
        self.path = directory / file_name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StartupError(f"{self.what} {str(self.path.parent)!r}: cannot use it: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            raise StartupError(
                f"{self.what} {str(self.path.parent)!r} is in use by another process{holder} (lock {self.path.name})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def listen_failure(address: str, error: OSError) -> StartupError:
    """The one line for a listener that cannot bind."""
    if error.errno == errno.EADDRINUSE:
        return StartupError(f"cannot listen on {address}: the address is in use by another process")
    return StartupError(f"cannot listen on {address}: {error.strerror or error}")
