"""The baselines of the end-to-end benchmark: an etcd cluster, a Redis pair, and the raw disk.

    EtcdCluster(directory)   3 etcd members on loopback (raft, fsync on as etcd ships);
                             driver kind "etcd": etcd's own gRPC KV API (Put, linearizable Range)
    RedisPair(directory)     a Redis primary and one replica, appendfsync always on both;
                             driver kind "redis": SET + WAIT 1 0 in one round trip, GET
    raw_rocksdict(...)       synced one-value WriteBatches through RocksDB's own WAL: what the disk
                             and the engine give with no network and no replication at all

Both systems keep to benchmarks/e2e/common.py (System, DriverSpec, open_driver). The binaries
come from Debian's packages (`ensure_installed`); the systems' `start()` installs them when
missing unless built with install=False.

    python -m benchmarks.e2e.baselines raw --value-size 1048576 --seconds 5 --dir D   # JSON on stdout
    python -m benchmarks.e2e.baselines up etcd --dir D      # runs until Ctrl-C or SIGTERM
    python -m benchmarks.e2e.baselines install redis        # apt-get the binary if missing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from benchmarks.e2e.common import PLACEMENTS, Driver, DriverSpec, SystemUnavailable
from replicator.local import free_ports

HOST = "127.0.0.1"

# what -> (binary, Debian package that provides it)
BINARIES: dict[str, tuple[str, str]] = {
    "etcd": ("etcd", "etcd-server"),
    "redis": ("redis-server", "redis-server"),
}

STOP_TIMEOUT_S = 10.0
TERM_REPEAT_S = 2.0
APT_TIMEOUT_S = 900.0

# ---------------------------------------------------------------------------------------------
# Installing the binaries


def find_binary(what: str) -> str | None:
    """The path of the binary for "etcd" or "redis", or None; never installs anything."""
    binary = _binary_name(what)
    found = shutil.which(binary)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):  # PATH may be minimal
        candidate = os.path.join(directory, binary)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_installed(what: str) -> str:
    """The path of the binary for "etcd" or "redis", installed from Debian's packages if missing.

    No service the package would start is left running: a policy-rc.d that refuses every start
    is in place during the install, and any process of the new binary found running right after
    it (there can be none of ours: the binary did not exist) is stopped by its PID.
    """
    binary = _binary_name(what)
    found = find_binary(what)
    if found:
        return found
    package = BINARIES[what][1]
    by_hand = f"install it by hand (`apt-get install -y {package}` as root on Debian/Ubuntu) or put `{binary}` on PATH"
    if shutil.which("apt-get") is None:
        raise SystemUnavailable(f"{what}: `{binary}` is not installed and there is no apt-get here; {by_hand}")
    if os.geteuid() != 0:
        raise SystemUnavailable(f"{what}: `{binary}` is not installed and installing needs root; {by_hand}")
    with _install_lock():
        found = find_binary(what)  # another process may have installed it while we waited
        if found:
            return found
        with _services_held_back():
            error = _apt_install(package)
        installed = find_binary(what)
        if installed:
            _stop_processes_of(installed)
    if not installed:
        raise SystemUnavailable(f"{what}: installing the Debian package {package} failed ({error}); {by_hand}")
    return installed


def _binary_name(what: str) -> str:
    if what not in BINARIES:
        raise ValueError(f"unknown baseline {what!r}; known: {', '.join(BINARIES)}")
    return BINARIES[what][0]


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    path = os.path.join(tempfile.gettempdir(), "replicator-bench-install.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _apt_install(package: str) -> str:
    """Installs `package`; on failure refreshes the package lists and tries once more. '' or the error."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    error = ""
    for attempt in range(2):
        if attempt == 1:  # most often: no package lists yet on a fresh machine
            update = _run_quietly(["apt-get", "update"], env)
            if update:
                return f"apt-get update: {update}"
        error = _run_quietly(install, env)
        if not error:
            return ""
    return error


def _run_quietly(command: list[str], env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return ""
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return f"exit {done.returncode}: " + " | ".join(tail)


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_REFUSE_ALL = "#!/bin/sh\n# benchmarks/e2e/baselines.py: no service starts during this package install\nexit 101\n"


@contextlib.contextmanager
def _services_held_back() -> Iterator[None]:
    """A policy-rc.d answering 101 (action forbidden) to every service start, removed afterwards."""
    original: tuple[bytes, int] | None = None
    if POLICY_RC_D.exists():
        if _refuses_starts(POLICY_RC_D):  # e.g. the one container images ship: leave it alone
            yield
            return
        original = (POLICY_RC_D.read_bytes(), POLICY_RC_D.stat().st_mode)
    POLICY_RC_D.write_text(_REFUSE_ALL)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        if original is None:
            POLICY_RC_D.unlink(missing_ok=True)
        else:
            POLICY_RC_D.write_bytes(original[0])
            POLICY_RC_D.chmod(original[1] & 0o7777)


def _refuses_starts(script: Path) -> bool:
    try:
        return subprocess.run([str(script), "redis-server", "start"], capture_output=True, timeout=10).returncode == 101
    except (OSError, subprocess.TimeoutExpired):
        return False


def _stop_processes_of(binary: str) -> None:
    """Stops, by PID, every process running `binary` (called right after installing it)."""
    target = os.path.realpath(binary)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if exe == target:
            _terminate_pid(int(entry))


def _terminate_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def binary_version(binary: str) -> str:
    """"3.4.23" from `etcd --version`, "7.0.15" from `redis-server --version`; "unknown" if neither says."""
    try:
        text = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"etcd Version:\s*(\S+)", text) or re.search(r"\bv=(\S+)", text)
    return match.group(1) if match else "unknown"


# ---------------------------------------------------------------------------------------------
# Processes


class _Processes:
    """Server processes this object started, stopped by PID: SIGTERM, then SIGKILL after a timeout."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._log_files: list[IO[bytes]] = []

    def launch(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        handle = open(log, "ab")
        self._log_files.append(handle)
        self.logs[name] = log
        self.running[name] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env, close_fds=True
        )

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.running.items()}

    def check_alive(self, what: str) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise SystemUnavailable(
                    f"{what}: {name} exited with code {process.returncode} while starting; "
                    f"its log {self.logs[name]} ends with: {_tail(self.logs[name])}"
                )

    def stop(self) -> None:
        """One at a time, the last started first: a member stopping while its peers still run hands
        over quickly (an etcd leader transfers leadership; a Redis replica goes before its primary,
        which then has nobody to wait for), where stopping all at once costs seconds of timeouts."""
        for process in reversed(list(self.running.values())):
            _stop_process(process)
        self.running.clear()
        for handle in self._log_files:
            handle.close()
        self._log_files.clear()


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (again every TERM_REPEAT_S: Redis refuses one that comes while it writes its first AOF),
    SIGKILL after STOP_TIMEOUT_S; reaped either way."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, min(TERM_REPEAT_S, deadline - time.monotonic())))
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    process.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty)"


def _fresh_directory(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _endpoint_address(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------------
# etcd


class _ServerSystem:
    """What the baseline systems share: where they live, how they start, the processes they run."""

    name = "?"
    COMMAND = "?"  # the server binary
    PACKAGE = "?"  # the Debian package that has it
    START_TIMEOUT_S = 60.0

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        install: bool = True,
        binary: str | None = None,
        start_timeout_s: float | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self._extra_args = list(extra_args)  # appended to every server's command line
        self._install = install
        self._binary = binary
        self._start_timeout_s = self.START_TIMEOUT_S if start_timeout_s is None else start_timeout_s
        self._processes = _Processes()
        self._ports: list[int] = []  # the ports the clients use
        self._version = "unknown"

    def _before_start(self) -> None:
        """Checks before anything is installed or started (none by default)."""

    def _start_once(self, binary: str) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._processes.running:
            raise RuntimeError(f"{self.name}: already started")
        self._before_start()
        binary = self._binary or (ensure_installed(self.name) if self._install else find_binary(self.name))
        if binary is None:
            raise SystemUnavailable(
                f"{self.name}: `{self.COMMAND}` is not installed; install it by hand: apt-get install -y {self.PACKAGE}"
            )
        self._version = binary_version(binary)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for attempt in (1, 2):  # a second try with new ports: another process may take a free port first
                try:
                    self._start_once(binary)
                    return
                except SystemUnavailable:
                    self._processes.stop()
                    if attempt == 2:
                        raise
        except BaseException:
            self._processes.stop()
            raise


class EtcdCluster(_ServerSystem):
    """A 3-member etcd cluster on 127.0.0.1: real processes, data and logs under `directory`.

    etcd's defaults otherwise, among them: fsync on every commit, requests up to 1.5 MiB
    (--max-request-bytes) and a 2 GiB backend quota (--quota-backend-bytes; past it etcd refuses
    writes with "database space exceeded", so long runs of large values need extra_args).
    """

    name = "etcd"
    COMMAND = "etcd"
    PACKAGE = "etcd-server"
    MEMBERS = 3

    def _start_once(self, binary: str) -> None:
        ports = free_ports(2 * self.MEMBERS, HOST)
        client_ports, peer_ports = ports[: self.MEMBERS], ports[self.MEMBERS :]
        names = [f"etcd-{index + 1}" for index in range(self.MEMBERS)]
        initial = ",".join(f"{name}=http://{HOST}:{port}" for name, port in zip(names, peer_ports, strict=True))
        token = f"replicator-bench-{os.getpid()}-{client_ports[0]}"
        # ETCD_* variables would clash with the flags (etcd refuses both at once)
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        for name, client, peer in zip(names, client_ports, peer_ports, strict=True):
            data = _fresh_directory(self.directory / name)
            command = [
                binary,
                "--name", name,
                "--data-dir", str(data),
                "--listen-client-urls", f"http://{HOST}:{client}",
                "--advertise-client-urls", f"http://{HOST}:{client}",
                "--listen-peer-urls", f"http://{HOST}:{peer}",
                "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--logger", "zap",
                "--log-outputs", "stderr",
                *self._extra_args,
            ]  # fmt: skip
            self._processes.launch(name, command, self.directory / f"{name}.log", env)
        self._ports = client_ports
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import grpc

        pb2, pb2_grpc = etcd_modules()
        endpoints = self._endpoints()
        deadline = time.monotonic() + self._start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            self._processes.check_alive("etcd")
            try:
                for index, endpoint in enumerate(endpoints):
                    with grpc.insecure_channel(endpoint) as channel:
                        kv = pb2_grpc.KVStub(channel)
                        key = f"__bench_health/{index}".encode()
                        kv.Put(pb2.PutRequest(key=key, value=b"ok"), timeout=2.0)
                        answer = kv.Range(pb2.RangeRequest(key=key), timeout=2.0)
                        if [kv.value for kv in answer.kvs] != [b"ok"]:
                            raise RuntimeError(f"{endpoint} read back {list(answer.kvs)!r}")
                return
            except (grpc.RpcError, RuntimeError) as exc:
                last_error = str(exc.details() if isinstance(exc, grpc.Call) else exc)
            time.sleep(0.2)
        raise SystemUnavailable(
            f"etcd: the cluster was not healthy within {self._start_timeout_s:.0f} s ({last_error}); "
            f"logs in {self.directory}"
        )

    def _endpoints(self) -> tuple[str, ...]:
        return tuple(f"{HOST}:{port}" for port in self._ports)

    def stop(self) -> None:
        self._processes.stop()

    def processes(self) -> dict[str, int]:
        return self._processes.pids()

    def driver_spec(self, placement: str = "both") -> DriverSpec:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
        if not self._processes.running:
            raise RuntimeError("etcd: not started")
        endpoints = self._endpoints()
        return DriverSpec(kind="etcd", endpoints=endpoints if placement == "both" else endpoints[:1])

    def version(self) -> str:
        return f"etcd {self._version}"

    def settings(self) -> str:
        return f"{self.MEMBERS} members on loopback, etcd's defaults (fsync on every commit), linearizable reads"

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


PROTO = Path(__file__).with_name("etcd_kv.proto")
_etcd_lock = threading.Lock()
_etcd_cache: tuple[ModuleType, ModuleType] | None = None


def etcd_modules() -> tuple[ModuleType, ModuleType]:
    """(etcd_kv_pb2, etcd_kv_pb2_grpc), compiled from etcd_kv.proto into a cache directory once."""
    global _etcd_cache
    with _etcd_lock:
        if _etcd_cache is None:
            directory = _compiled_proto_directory()
            if str(directory) not in sys.path:
                sys.path.insert(0, str(directory))
            _etcd_cache = (importlib.import_module("etcd_kv_pb2"), importlib.import_module("etcd_kv_pb2_grpc"))
        return _etcd_cache


def _compiled_proto_directory() -> Path:
    import google.protobuf
    import grpc_tools
    from grpc_tools import protoc

    tools_version = getattr(grpc_tools, "__version__", "") or _distribution_version("grpcio-tools")
    digest = hashlib.sha256(PROTO.read_bytes() + f"{tools_version}/{google.protobuf.__version__}".encode())
    cache = Path(tempfile.gettempdir()) / f"replicator-bench-etcd-proto-{os.getuid()}-{digest.hexdigest()[:16]}"
    if (cache / "etcd_kv_pb2_grpc.py").exists() and cache.stat().st_uid == os.getuid():
        return cache
    # compile next to it, then rename: concurrent workers never import a half-written module
    scratch = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        arguments = ["protoc", f"-I{PROTO.parent}", f"-I{well_known}", f"--python_out={scratch}"]
        if protoc.main([*arguments, f"--grpc_python_out={scratch}", str(PROTO)]) != 0:
            raise SystemUnavailable(f"etcd: protoc failed on {PROTO}")
        try:
            os.rename(scratch, cache)
        except OSError:  # another process got there first
            if not (cache / "etcd_kv_pb2_grpc.py").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cache


def _distribution_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


class EtcdDriver:
    """One gRPC channel to one member; Put, and Range with etcd's default linearizable read."""

    def __init__(self, endpoint: str, timeout_s: float | None = None) -> None:
        import grpc.aio

        self._pb2, pb2_grpc = etcd_modules()
        self.endpoint = endpoint
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            endpoint, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._kv = pb2_grpc.KVStub(self._channel)

    async def connect(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def put(self, key: str, value: bytes) -> None:
        await self._kv.Put(self._pb2.PutRequest(key=key.encode(), value=value), timeout=self._timeout_s)

    async def get(self, key: str) -> bytes | None:
        answer = await self._kv.Range(self._pb2.RangeRequest(key=key.encode()), timeout=self._timeout_s)
        return bytes(answer.kvs[0].value) if answer.kvs else None

    async def close(self) -> None:
        await self._channel.close()


# ---------------------------------------------------------------------------------------------
# Redis


class RedisPair(_ServerSystem):
    """A Redis primary and one replica on 127.0.0.1, appendfsync always on both."""

    name = "redis"
    COMMAND = "redis-server"
    PACKAGE = "redis-server"
    START_TIMEOUT_S = 30.0

    def _before_start(self) -> None:
        _redis_module()  # the driver's library first: no point starting servers nobody can talk to

    def _start_once(self, binary: str) -> None:
        primary_port, replica_port = free_ports(2, HOST)
        for name, port in (("redis-primary", primary_port), ("redis-replica", replica_port)):
            data = _fresh_directory(self.directory / name)
            command = [
                binary,
                "--bind", HOST,
                "--port", str(port),
                "--dir", str(data),
                "--daemonize", "no",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--logfile", "",
                # the replica's first sync starts at once (the default waits 5 s for more replicas)
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            if name == "redis-replica":
                command += ["--replicaof", HOST, str(primary_port)]
            command += self._extra_args
            self._processes.launch(name, command, self.directory / f"{name}.log")
        self._ports = [primary_port, replica_port]
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        redis = _redis_module()
        deadline = time.monotonic() + self._start_timeout_s
        last_error = "no answer yet"
        primary = redis.Redis(host=HOST, port=self._ports[0], socket_timeout=2.0)
        replica = redis.Redis(host=HOST, port=self._ports[1], socket_timeout=2.0)
        try:
            while time.monotonic() < deadline:
                self._processes.check_alive("redis")
                try:
                    link = replica.info("replication").get("master_link_status")
                    replicas = primary.info("replication").get("connected_slaves", 0)
                    # after its first sync the replica rewrites its AOF: let that finish before any load
                    rewriting = any(
                        int(state.get(field, 0))
                        for state in (primary.info("persistence"), replica.info("persistence"))
                        for field in ("loading", "aof_rewrite_in_progress", "aof_rewrite_scheduled")
                    )
                    if link == "up" and int(replicas) >= 1 and not rewriting:
                        return
                    last_error = f"replica link {link!r}, primary sees {replicas} replica(s), AOF rewrite {rewriting}"
                except redis.RedisError as exc:
                    last_error = str(exc)
                time.sleep(0.1)
        finally:
            primary.close()
            replica.close()
        raise SystemUnavailable(
            f"redis: the replica was not in sync within {self._start_timeout_s:.0f} s ({last_error}); "
            f"logs in {self.directory}"
        )

    def stop(self) -> None:
        self._processes.stop()

    def processes(self) -> dict[str, int]:
        return self._processes.pids()

    def driver_spec(self, placement: str = "both") -> DriverSpec:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
        if not self._processes.running:
            raise RuntimeError("redis: not started")
        # the replica takes no writes: both placements write (and read) at the primary
        return DriverSpec(kind="redis", endpoints=(f"{HOST}:{self._ports[0]}",), options={"replicas": 1})

    def version(self) -> str:
        return f"redis {self._version}"

    def settings(self) -> str:
        return "primary + 1 replica on loopback, appendonly yes, appendfsync always, no RDB; every SET followed by WAIT 1 0"

    def __enter__(self) -> RedisPair:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise SystemUnavailable(
            "redis: the Python client is missing; `pip install redis` (or install this project with the bench extra)"
        ) from exc
    return redis


class ReplicaNotAcknowledged(RuntimeError):
    """WAIT answered fewer replicas than asked: the write is not known to be on the replica."""


def check_wait_answer(answer: object, replicas: int = 1) -> int:
    """WAIT's answer (the number of replicas that acknowledged); raises if it is not >= `replicas`."""
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < replicas:
        raise ReplicaNotAcknowledged(f"WAIT {replicas} answered {answer!r}: fewer than {replicas} replica(s) acknowledged")
    return answer


class RedisDriver:
    """redis.asyncio on the primary; a pool as large as the worker's concurrency."""

    def __init__(self, endpoint: str, concurrency: int = 128, replicas: int = 1, wait_timeout_ms: int = 0) -> None:
        _redis_module()
        import redis.asyncio

        host, port = _endpoint_address(endpoint)
        self.endpoint = endpoint
        self._replicas = replicas
        self._wait_timeout_ms = wait_timeout_ms
        # blocking: a coroutine waits for a free connection rather than failing with "too many connections"
        self._pool = redis.asyncio.BlockingConnectionPool(
            host=host, port=port, max_connections=max(1, concurrency), timeout=None
        )
        self._client: Any = redis.asyncio.Redis(connection_pool=self._pool)

    async def connect(self) -> None:
        await self._client.ping()

    async def put(self, key: str, value: bytes) -> None:
        # one round trip: SET and WAIT are written together, WAIT answers once the replica has the SET
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(key, value)
            pipe.wait(self._replicas, self._wait_timeout_ms)
            _, acknowledged = await pipe.execute()
        check_wait_answer(acknowledged, self._replicas)

    async def get(self, key: str) -> bytes | None:
        value = await self._client.get(key)
        return None if value is None else bytes(value)

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()


# ---------------------------------------------------------------------------------------------
# The contract's entry point


async def open_driver(spec: DriverSpec, worker: int) -> Driver:
    """The driver for an "etcd" or "redis" spec; etcd workers spread over the members round-robin."""
    if not spec.endpoints:
        raise ValueError(f"{spec.kind}: the spec names no endpoint")
    if spec.kind == "etcd":
        etcd = EtcdDriver(spec.endpoints[worker % len(spec.endpoints)], timeout_s=spec.options.get("timeout_s"))
        try:
            await etcd.connect()
        except BaseException:
            await etcd.close()
            raise
        return etcd
    if spec.kind == "redis":
        redis_driver = RedisDriver(
            spec.endpoints[0],
            concurrency=int(spec.options.get("concurrency", 128)),
            replicas=int(spec.options.get("replicas", 1)),
            wait_timeout_ms=int(spec.options.get("wait_timeout_ms", 0)),
        )
        try:
            await redis_driver.connect()
        except BaseException:
            await redis_driver.close()
            raise
        return redis_driver
    raise ValueError(f"benchmarks.e2e.baselines has no driver of kind {spec.kind!r}")


# ---------------------------------------------------------------------------------------------
# The raw disk through RocksDB


def raw_rocksdict(
    directory: str | os.PathLike[str], value_size: int, seconds: float, threads: int = 1, *, keep: bool = False
) -> dict[str, float]:
    """Synced writes through RocksDB's own WAL for `seconds` in `threads` threads.

    Each write is a WriteBatch holding one value of `value_size` random bytes under a fresh key,
    written with WriteOptions(sync=True). mb_per_s counts value bytes in 10^6 bytes; the
    latencies are of db.write alone; cpu_s is this process's CPU time (RocksDB's threads included).
    The database is destroyed afterwards unless `keep`.
    """
    from rocksdict import Options, Rdict, WriteBatch, WriteOptions

    if value_size < 1 or seconds <= 0 or threads < 1:
        raise ValueError("value_size, seconds and threads must be positive")
    path = str(directory)
    os.makedirs(path, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(path, options)
    writing = WriteOptions()
    writing.sync = True
    setattr(writing, "disable_wal", False)  # noqa: B010  (a property at run time; the stub says a method)
    spread = 65_536
    random_bytes = os.urandom(value_size + spread)  # values are slices at varying offsets: no two alike
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start_barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def loop(thread: int) -> None:
        mine = latencies[thread]
        sequence = 0
        start_barrier.wait()
        try:
            while time.perf_counter() < deadline[0]:
                offset = (sequence * 4_099 + thread * 8_191) % spread
                batch = WriteBatch(raw_mode=True)
                batch.put(f"raw/{thread:03d}/{sequence:012d}".encode(), random_bytes[offset : offset + value_size])
                began = time.perf_counter()
                db.write(batch, writing)
                mine.append(time.perf_counter() - began)
                sequence += 1
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=loop, args=(index,), name=f"raw-rocksdict-{index}") for index in range(threads)]
    try:
        for worker in workers:
            worker.start()
        cpu_began = time.process_time()
        began = time.perf_counter()
        deadline[0] = began + seconds
        start_barrier.wait()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - began
        cpu_s = time.process_time() - cpu_began
    finally:
        db.close()
        if not keep:
            Rdict.destroy(path, options)
    if errors:
        raise errors[0]
    every = sorted(latency for per_thread in latencies for latency in per_thread)
    ops = len(every)
    return {
        "ops": ops,
        "seconds": elapsed,
        "ops_per_s": ops / elapsed,
        "mb_per_s": ops * value_size / elapsed / 1e6,
        "p50_ms": _percentile(every, 0.50) * 1e3,
        "p99_ms": _percentile(every, 0.99) * 1e3,
        "cpu_s": cpu_s,
        "value_size": value_size,
        "threads": threads,
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ---------------------------------------------------------------------------------------------
# Command line


def _system(what: str, directory: str, install: bool) -> EtcdCluster | RedisPair:
    return EtcdCluster(directory, install=install) if what == "etcd" else RedisPair(directory, install=install)


def _up(what: str, directory: str, install: bool) -> int:
    system = _system(what, directory, install)
    stopping = threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        stopping.set()

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        system.start()
        spec = system.driver_spec("both")
        print(
            json.dumps(
                {
                    "system": system.name,
                    "version": system.version(),
                    "settings": system.settings(),
                    "endpoints": list(spec.endpoints),
                    "pids": system.processes(),
                    "directory": str(system.directory),
                },
                indent=2,
            ),
            flush=True,
        )
        print("up; Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        system.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e.baselines",
        description=(
            "The baselines of the end-to-end benchmark. `raw` measures synced RocksDB writes (the disk's limit "
            "through the same engine) and prints a JSON object; `up` starts an etcd cluster (3 members) or a "
            "Redis primary with a replica on 127.0.0.1 and keeps it up until Ctrl-C or SIGTERM; `install` "
            "installs the binary from Debian's packages if it is missing."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    raw = commands.add_parser("raw", help="synced one-value WriteBatches through RocksDB's WAL; JSON on stdout")
    raw.add_argument("--dir", required=True, help="the RocksDB directory (destroyed afterwards unless --keep)")
    raw.add_argument("--value-size", type=int, default=1_048_576, help="bytes per value (default 1 MiB)")
    raw.add_argument("--seconds", type=float, default=5.0, help="how long to write (default 5)")
    raw.add_argument("--threads", type=int, default=1, help="writing threads (default 1)")
    raw.add_argument("--keep", action="store_true", help="keep the database afterwards")
    up = commands.add_parser("up", help="start etcd or redis on loopback and stay up until Ctrl-C/SIGTERM")
    up.add_argument("what", choices=sorted(BINARIES))
    up.add_argument("--dir", required=True, help="data directories and logs go here (member directories are wiped)")
    up.add_argument("--no-install", action="store_true", help="fail instead of installing a missing binary")
    install = commands.add_parser("install", help="install the binary from Debian's packages if missing; prints its path")
    install.add_argument("what", choices=sorted(BINARIES))
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "raw":
            result = raw_rocksdict(arguments.dir, arguments.value_size, arguments.seconds, arguments.threads, keep=arguments.keep)
            print(json.dumps(result))
            return 0
        if arguments.command == "install":
            binary = ensure_installed(arguments.what)
            print(f"{binary} ({binary_version(binary)})")
            return 0
        return _up(arguments.what, arguments.dir, not arguments.no_install)
    except SystemUnavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
