"""Start-up and shutdown shared by the daemons.

    async def amain(stop: asyncio.Event) -> int:
        ...start things...
        await stop.wait()                       # set by SIGTERM or SIGINT
        shutdown = Shutdown([("grpc", lambda: server.stop(1.0), 5.0),
                             ("storage", store.close, 5.0)])
        await shutdown.run()
        return 0

    sys.exit(run(amain))

`run` installs uvloop (unless REPLICATOR_NO_UVLOOP=1 or it is missing),
installs handlers for every signal whose default would kill the process
(`STOP_SIGNALS`: SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2) that log it and
set the `stop` event, so each goes through the staged shutdown; runs the
coroutine and returns its exit code (None counts as 0). A second stopping
signal while shutting down exits at once with status 1 (the operator insisted).

SIGHUP does not stop a daemon (a logrotate `postrotate kill -HUP`, or a closed
ssh session): it is logged and, when stderr was a regular file at start-up,
that path is opened again (append) onto stderr, so a rotated log gets a fresh
file; otherwise (a pipe, a terminal, journald) it is ignored.

`Shutdown` runs its stages in order; each gets its own timeout. Every stage
is logged (`shutdown_stage` with its name, outcome ok|timeout|error and
duration_ms); a stage that times out or fails is logged and the next one
runs anyway.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from replicator.daemon.logs import log

__all__ = ["STOP_SIGNALS", "Shutdown", "Stage", "install_uvloop", "loop_factory", "quiet_grpc_core", "run", "sd_notify"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify units) where the daemon is: "READY=1", "STOPPING=1", "STATUS=...".

    A datagram to $NOTIFY_SOCKET (an abstract socket when it starts with "@"); nothing when the
    variable is unset (not started by systemd). True if sent."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def quiet_grpc_core() -> None:
    """Keep gRPC's C core from writing its own (non-JSON) lines to our log stream: errors it would
    print there (a refused TLS handshake, ...) reach the operator as our own structured events or as
    the client's error instead. GRPC_VERBOSITY set in the environment still wins (debugging)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # also set on import of replicator.daemon


def stderr_file() -> str | None:
    """The path of the regular file stderr writes to, or None (a pipe, a terminal, a socket)."""
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            return None
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return None


def reopen_stderr(path: str) -> bool:
    """Point fd 2 (our JSON log and gRPC's own lines) at `path` again, appending. True if done."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return True


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (the default loop) if disabled or unavailable."""
    if os.environ.get("REPLICATOR_NO_UVLOOP") == "1":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def install_uvloop() -> bool:
    """Make new event loops uvloop loops (for code that calls asyncio.run itself). True if installed."""
    factory = loop_factory()
    if factory is None:
        return False
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run `main(stop)` on uvloop with the STOP_SIGNALS setting `stop`; return its exit code."""

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals_seen: list[str] = []

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            signals_seen.append(name)
            if len(signals_seen) == 1:
                log("signal", signal=name, action="shutting down")
                stop.set()
            else:
                log("signal", level="warning", signal=name, action="exiting now, shutdown not finished")
                sys.stderr.flush()
                os._exit(1)

        log_path = stderr_file()

        def on_hangup() -> None:
            if log_path is not None and reopen_stderr(log_path):
                log("signal", signal="SIGHUP", action="log reopened", path=log_path)
            else:
                log("signal", signal="SIGHUP", action="ignored (the log is not a file to reopen)")

        installed = []
        handlers: list[tuple[int, Callable[..., None], tuple[int, ...]]] = [
            *((signum, on_signal, (signum,)) for signum in STOP_SIGNALS),
            (signal.SIGHUP, on_hangup, ()),
        ]
        for signum, handler, arguments in handlers:
            try:
                loop.add_signal_handler(signum, handler, *arguments)
                installed.append(signum)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
                pass
        try:
            code = await main(stop)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
        return 0 if code is None else int(code)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(wrapper())


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    factory: Callable[[], Awaitable[Any]]
    timeout_s: float


class Shutdown:
    """Stages run in order, each bounded by its own timeout, each logged with its duration."""

    def __init__(self, stages: Iterable[tuple[str, Callable[[], Awaitable[Any]], float]] = ()) -> None:
        self.stages: list[Stage] = [Stage(*s) for s in stages]
        self.outcomes: list[tuple[str, str, float]] = []  # (name, ok|timeout|error, seconds)
        self._ran = False

    def add(self, name: str, factory: Callable[[], Awaitable[Any]], timeout_s: float) -> None:
        self.stages.append(Stage(name, factory, timeout_s))

    async def run(self) -> bool:
        """Run every stage once; True if all finished in time without error."""
        if self._ran:
            return all(outcome == "ok" for _, outcome, _ in self.outcomes)
        self._ran = True
        started = time.monotonic()
        for stage in self.stages:
            t0 = time.monotonic()
            outcome, error = "ok", None
            try:
                await asyncio.wait_for(stage.factory(), stage.timeout_s)
            except TimeoutError:
                outcome = "timeout"
            except Exception as exc:
                outcome, error = "error", exc
            duration = time.monotonic() - t0
            self.outcomes.append((stage.name, outcome, duration))
            fields: dict[str, Any] = {
                "stage": stage.name,
                "outcome": outcome,
                "duration_ms": round(duration * 1000, 1),
                "timeout_ms": round(stage.timeout_s * 1000),
            }
            if error is not None:
                fields["error"] = error
            log("shutdown_stage", level="info" if outcome == "ok" else "warning", **fields)
        clean = all(outcome == "ok" for _, outcome, _ in self.outcomes)
        log("shutdown_done", clean=clean, duration_ms=round((time.monotonic() - started) * 1000, 1))
        return clean
