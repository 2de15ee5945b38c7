"""`replicator-local`: a witness and two sites on loopback, for the demo, the tests and a first try.

    replicator-local up --dir DIR       # configs, start, wait healthy, stay in the foreground; Ctrl-C stops all
    replicator-local up --dir DIR --tls # the same with mutual TLS on every link (certificates in DIR/tls/)
    replicator-local status --dir DIR   # each recorded process: running?, health
    replicator-local down --dir DIR     # stop the processes recorded in DIR/cluster.json

`up` writes DIR/witness.toml, DIR/a.toml and DIR/b.toml on first use (free
ports on 127.0.0.1, data under DIR/data/, short timeouts for a loopback demo)
and reuses them afterwards, so the sites pick up where they were. Each process
runs as `python -m replicator.daemon.<witness|site> --config DIR/<name>.toml`
with its log in DIR/<name>.log and can be killed and started again on its
own with that command. DIR/cluster.json records what runs:

    {"witness": {"pid": N, "grpc": "127.0.0.1:P", "config": "DIR/witness.toml"},
     "sites": {"a": {"pid": N, "grpc": "...", "peer": "...", "metrics": "...", "config": "DIR/a.toml",
                     "s3": "http://127.0.0.1:P"},
               "b": {...}}}

("peer" is the site's log-shipping listen address, "s3" the site's S3 endpoint URL;
the S3 access key and secret, the same at both sites, are in DIR/s3-credentials.toml.) With TLS, DIR/tls/ holds
a private CA and certificates for a, b, the witness and a client (the
operator), every configuration has its [tls.*] sections, health checks use
the client certificate and cluster.json also records
"tls": {"ca": ..., "cert": ..., "key": ...} (the client's files, for
replicatorctl --ca --cert --key). As a library:

    with LocalCluster(tmp_path) as cluster:
        cluster.start(sites=True)          # raises LocalClusterError naming the process and its log tail
        cluster.cluster["sites"]["a"]["grpc"]
        cluster.kill("a"); cluster.restart("a")
    with LocalCluster(tmp_path, tls=True) as cluster: ...   # mutual TLS; cluster.client_tls is a TlsFiles
    # every process started is stopped on exit (SIGTERM, then SIGKILL after stop_timeout_s)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import replicator
from replicator import __version__
from replicator.config import (
    ListenConfig,
    NbdConfig,
    PairSpec,
    S3Config,
    SiteConfig,
    SiteSection,
    TlsConfig,
    TlsFiles,
    WitnessClientConfig,
    WitnessConfig,
    WitnessListenConfig,
    WitnessSection,
    load_site_config,
    load_witness_config,
)

__all__ = [
    "DEMO_SITE_SETTINGS",
    "PATIENT_PEER_TIMEOUTS",
    "DEMO_WITNESS_SETTINGS",
    "TIMEOUT_PROFILES",
    "PAIR_ID",
    "SITE_MODULE",
    "SITE_NAMES",
    "TLS_CLIENT",
    "TLS_DIR",
    "WITNESS_MODULE",
    "LocalCluster",
    "LocalClusterError",
    "free_ports",
    "grpc_health",
    "main",
    "same_process",
    "site_daemon_available",
]

SITE_MODULE = "replicator.daemon.site"
WITNESS_MODULE = "replicator.daemon.witness"
PAIR_ID = "pair-1"
SITE_NAMES = ("a", "b")
WITNESS = "witness"
TLS_DIR = "tls"  # under the cluster directory: the CA, one certificate per process, one for the client
TLS_CA = "ca"
TLS_CLIENT = "client"

# Short timeouts for a demo on loopback (the defaults are for a metro network).
DEMO_SITE_SETTINGS: dict[str, Any] = {
    "peer_timeout_ms": 500,
    "heartbeat_interval_ms": 100,
    "lease_ms": 1000,
    "reconnect_backoff_ms_max": 200,
    "shutdown_stage_timeout_ms": 2000,
}
# For runs that are not about failover (the s3-tests suite, benchmarks): on a loaded 2-core machine the
# demo's 500 ms peer timeout makes the pair fail over (and answer 503) in the middle of them.
PATIENT_PEER_TIMEOUTS: dict[str, int | str | bool] = {"peer_timeout_ms": 3000, "lease_ms": 4000, "heartbeat_interval_ms": 200}
DEMO_WITNESS_SETTINGS: dict[str, Any] = {
    "preferred_grace_ms": 300,
    "request_timeout_ms": 2000,
    "shutdown_stage_timeout_ms": 2000,
}
DEMO_WITNESS_CLIENT = {"timeout_ms": 1000, "retry_interval_ms": 100}
TIMEOUT_PROFILES = ("demo", "production")  # production: every timeout at the configuration default
S3_CREDENTIALS = "s3-credentials.toml"  # under the cluster directory: the S3 access key and secret of both sites


def _default(kind: type, name: str) -> Any:
    """A configuration dataclass field's shipped default."""
    return kind.__dataclass_fields__[name].default  # type: ignore[attr-defined]


class LocalClusterError(Exception):
    """The cluster could not be configured, started or stopped; the message says which process and why."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now (all sockets held until every port is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def site_daemon_available() -> bool:
    try:
        return importlib.util.find_spec(SITE_MODULE) is not None
    except (ImportError, ValueError):
        return False


def same_process(pid: int, config: str | os.PathLike[str]) -> bool:
    """True if `pid` is alive (not a zombie) and its command line names `config`."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(config) in raw.decode(errors="replace").split("\0")


def grpc_health(address: str, timeout_s: float = 1.0, service: str = "", tls: TlsFiles | None = None) -> str:
    """The grpc.health.v1 status ("SERVING", "NOT_SERVING", ...) of `address`, or "UNREACHABLE".

    With `tls` (CA, client certificate and key) the check runs over mutual TLS.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        ca, cert, key = tls.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(address, credentials)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@dataclass
class _Process:
    name: str
    module: str
    config: Path
    log: Path
    grpc: str
    extra: dict[str, str]  # sites: peer (link listen address), metrics
    popen: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    health_tls: TlsFiles | None = None  # client credentials for the health check when its gRPC is TLS


class LocalCluster:
    """A witness and two sites under one directory, as separate processes."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        health_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        python: str = sys.executable,
        tls: bool = False,
        peer_timeout_ms: int | None = None,
        timeouts: str = "demo",
    ) -> None:
        """`peer_timeout_ms` replaces the demo's 500 ms in both sites (a loaded machine needs more:
        a site that misses the peer's heartbeats that long suspends).

        `timeouts` is "demo" (the short loopback timeouts of DEMO_SITE_SETTINGS, DEMO_WITNESS_SETTINGS and
        DEMO_WITNESS_CLIENT) or "production" (every timeout at the configuration's shipped default, as an
        operator's deployment runs: the benchmark measures both)."""
        if timeouts not in TIMEOUT_PROFILES:
            raise LocalClusterError(f"timeouts must be one of {', '.join(TIMEOUT_PROFILES)}, got {timeouts!r}")
        heartbeat_interval_ms = (
            DEMO_SITE_SETTINGS["heartbeat_interval_ms"]
            if timeouts == "demo"
            else _default(SiteSection, "heartbeat_interval_ms")
        )
        if peer_timeout_ms is not None and peer_timeout_ms <= 2 * heartbeat_interval_ms:
            raise LocalClusterError(
                f"peer_timeout_ms must be more than twice the heartbeat ({heartbeat_interval_ms} ms), "
                f"got {peer_timeout_ms}"
            )
        self.peer_timeout_ms = peer_timeout_ms
        self.timeouts = timeouts
        self.directory = Path(directory).resolve()
        self.health_timeout_s = health_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.python = python
        # Mutual TLS on every link. A directory configured with TLS earlier keeps it even if tls=False.
        self.tls = tls
        self.client_tls: TlsFiles | None = None  # the client (operator) certificate, once configured with TLS
        self.processes: dict[str, _Process] = {}
        self.started: list[str] = []  # names started by this object, in order

    # ------------------------------------------------------------ configuration
    @property
    def cluster_file(self) -> Path:
        return self.directory / "cluster.json"

    def config_path(self, name: str) -> Path:
        return self.directory / f"{name}.toml"

    @property
    def tls_directory(self) -> Path:
        return self.directory / TLS_DIR

    def tls_files(self, name: str) -> TlsFiles:
        """The CA, certificate and key of `name` (a, b, witness or client) under DIR/tls/ (absolute paths)."""
        directory = self.tls_directory
        return TlsFiles(directory / f"{TLS_CA}.pem", directory / f"{name}.pem", directory / f"{name}.key")

    def configure(self) -> None:
        """Write the three configuration files, or reuse them if they exist; fill `processes`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        names = (WITNESS, *SITE_NAMES)
        present = [n for n in names if self.config_path(n).exists()]
        if present and len(present) != len(names):
            missing = [str(self.config_path(n)) for n in names if n not in present]
            raise LocalClusterError(
                f"{self.directory} holds some configuration files but not {', '.join(missing)}: "
                f"restore them or use an empty directory"
            )
        if not present:
            if self.tls:
                self._make_certificates()
            self._write_configs()
        try:
            witness = load_witness_config(self.config_path(WITNESS))
            sites = {n: load_site_config(self.config_path(n)) for n in SITE_NAMES}
        except Exception as error:
            raise LocalClusterError(f"invalid configuration in {self.directory}: {error}") from None
        configured_tls = witness.tls.grpc is not None or any(s.tls.grpc is not None for s in sites.values())
        if self.tls and not configured_tls:
            raise LocalClusterError(
                f"{self.directory} was configured without TLS: start it without --tls (tls=False), "
                f"or use an empty directory for a TLS deployment"
            )
        self.tls = configured_tls
        self.client_tls = None
        if configured_tls:
            client = self.tls_files(TLS_CLIENT)
            missing = [str(p) for p in (client.ca_file, client.cert_file, client.key_file) if not p.is_file()]
            if missing:
                raise LocalClusterError(
                    f"{self.directory} is configured with TLS but the client certificate files are missing: "
                    f"{', '.join(missing)}"
                )
            self.client_tls = client
        self.processes[WITNESS] = _Process(
            WITNESS,
            WITNESS_MODULE,
            self.config_path(WITNESS),
            self.directory / f"{WITNESS}.log",
            witness.listen.grpc,
            {"metrics": witness.listen.metrics},
            health_tls=self.client_tls if witness.tls.grpc is not None else None,
        )
        for name, site in sites.items():
            self.processes[name] = _Process(
                name,
                SITE_MODULE,
                self.config_path(name),
                self.directory / f"{name}.log",
                site.listen.grpc,
                {"peer": site.listen.link, "metrics": site.listen.metrics}
                | ({"nbd": site.nbd.listen} if site.nbd.listen else {})
                | ({"s3": ("https://" if site.tls.s3 else "http://") + site.s3.listen} if site.s3.enabled else {}),
                health_tls=self.client_tls if site.tls.grpc is not None else None,
            )

    def _make_certificates(self) -> None:
        """DIR/tls/: a CA and certificates for a, b, the witness and the client; kept if all are there."""
        from replicator.tlsutil import TlsError, make_ca, make_certificate

        directory = self.tls_directory
        names = (*SITE_NAMES, WITNESS, TLS_CLIENT)
        wanted = [directory / f"{n}.{s}" for n in (TLS_CA, *names) for s in ("pem", "key")]
        if all(p.is_file() for p in wanted):
            return
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            ca = make_ca(directory, TLS_CA, common_name=f"Replicator local CA ({self.directory.name})")
            for name in names:
                # Sites: the link checks the peer's certificate against the peer's site name (DNS:<name>);
                # gRPC clients check 127.0.0.1. The client certificate is for clients only.
                make_certificate(directory, name, ca, server=name != TLS_CLIENT)
        except (TlsError, OSError, ValueError) as error:
            raise LocalClusterError(f"cannot make TLS certificates in {directory}: {error}") from None

    def _relative_tls(self, name: str) -> TlsFiles:
        """`name`'s TLS files relative to the directory (configs resolve them against their own directory)."""
        return TlsFiles(
            *(Path(TLS_DIR) / f"{stem}.{suffix}" for stem, suffix in ((TLS_CA, "pem"), (name, "pem"), (name, "key")))
        )

    def set_site_values(self, section: str, values: dict[str, int | str | bool]) -> None:
        """Set `key = value` in [section] of both sites' configuration files (written by configure()
        if missing), then prove they still load. For tests and benchmarks that need other limits."""
        if not self.config_path(SITE_NAMES[0]).exists():
            self.configure()
        for name in SITE_NAMES:
            path = self.config_path(name)
            lines = path.read_text().splitlines()
            header = f"[{section}]"
            if header not in lines:
                lines += ["", header]
            start = lines.index(header) + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
            for key, value in values.items():
                rendered = f"{key} = {json.dumps(value)}"
                found = [i for i in range(start, end) if lines[i].split("=", 1)[0].strip() == key]
                if found:
                    lines[found[0]] = rendered
                else:
                    lines.insert(end, rendered)
                    end += 1
            _write_atomically(path, "\n".join(lines) + "\n")
            load_site_config(path)

    @property
    def s3_credentials_file(self) -> Path:
        return self.directory / S3_CREDENTIALS

    def s3_credentials(self) -> tuple[str, str]:
        """(access key, secret key) of the S3 endpoints (DIR/s3-credentials.toml)."""
        from replicator.s3.auth import load_credentials

        return next(iter(load_credentials(self.s3_credentials_file).items()))

    def _write_s3_credentials(self) -> None:
        access = "RK" + os.urandom(9).hex().upper()
        secret = base64.b64encode(os.urandom(30)).decode()
        text = f'[[credentials]]\naccess_key = "{access}"\nsecret_key = "{secret}"\n'
        temporary = self.s3_credentials_file.with_name(S3_CREDENTIALS + ".tmp")
        temporary.write_text(text)
        temporary.chmod(0o600)
        os.replace(temporary, self.s3_credentials_file)

    def _demo(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The demo's short timeouts, or none (the configuration defaults) with timeouts="production"."""
        return dict(settings) if self.timeouts == "demo" else {}

    def _write_configs(self) -> None:
        self._write_s3_credentials()
        ports = iter(free_ports(2 + 5 * len(SITE_NAMES)))
        host = "127.0.0.1"
        witness_grpc, witness_metrics = f"{host}:{next(ports)}", f"{host}:{next(ports)}"
        listens = {
            name: ListenConfig(
                grpc=f"{host}:{next(ports)}", link=f"{host}:{next(ports)}", metrics=f"{host}:{next(ports)}"
            )
            for name in SITE_NAMES
        }
        witness = WitnessConfig(
            witness=WitnessSection(data_dir=Path("data") / WITNESS, **self._demo(DEMO_WITNESS_SETTINGS)),
            listen=WitnessListenConfig(grpc=witness_grpc, metrics=witness_metrics),
            pairs=(PairSpec(id=PAIR_ID, sites=SITE_NAMES, preferred_site=SITE_NAMES[0]),),
            tls=TlsConfig(grpc=self._relative_tls(WITNESS)) if self.tls else TlsConfig(),
        )
        configs: dict[str, WitnessConfig | SiteConfig] = {WITNESS: witness}
        for name in SITE_NAMES:
            peer = next(n for n in SITE_NAMES if n != name)
            configs[name] = SiteConfig(
                site=SiteSection(
                    name=name,
                    peer_name=peer,
                    pair_id=PAIR_ID,
                    data_dir=Path("data") / name,
                    peer_address=listens[peer].link,
                    peer_grpc_address=listens[peer].grpc,
                    preferred_site=SITE_NAMES[0],
                    **(
                        self._demo(DEMO_SITE_SETTINGS)
                        | ({"peer_timeout_ms": self.peer_timeout_ms} if self.peer_timeout_ms is not None else {})
                    ),
                ),
                listen=listens[name],
                nbd=NbdConfig(listen=f"{host}:{next(ports)}"),
                witness=WitnessClientConfig(address=witness_grpc, **self._demo(DEMO_WITNESS_CLIENT)),
                # gRPC, link, witness client, NBD (STARTTLS, client certificate required) and S3 (HTTPS).
                tls=TlsConfig(*(self._relative_tls(name),) * 5) if self.tls else TlsConfig(),
                s3=S3Config(enabled=True, listen=f"{host}:{next(ports)}", credentials_file=S3_CREDENTIALS),
            )
        for name, config in configs.items():
            _write_atomically(self.config_path(name), config.to_toml())
        # Prove the files load back (the daemons would refuse them otherwise).
        load_witness_config(self.config_path(WITNESS))
        for name in SITE_NAMES:
            load_site_config(self.config_path(name))

    # ------------------------------------------------------------ cluster.json
    @property
    def cluster(self) -> dict[str, Any]:
        """The parsed DIR/cluster.json."""
        return json.loads(self.cluster_file.read_text())  # type: ignore[no-any-return]

    def _entry(self, process: _Process) -> dict[str, Any]:
        entry: dict[str, Any] = {"pid": process.pid, "grpc": process.grpc}
        if process.name != WITNESS:
            entry["peer"] = process.extra["peer"]
            entry["metrics"] = process.extra["metrics"]
            if "nbd" in process.extra:
                entry["nbd"] = process.extra["nbd"]
            if "s3" in process.extra:
                entry["s3"] = process.extra["s3"]
        entry["config"] = str(process.config)
        return entry

    def _write_cluster(self) -> None:
        document: dict[str, Any] = {"witness": None, "sites": {}}
        if self.client_tls is not None:
            client = self.client_tls
            document["tls"] = {"ca": str(client.ca_file), "cert": str(client.cert_file), "key": str(client.key_file)}
        witness = self.processes.get(WITNESS)
        if witness is not None and witness.pid is not None:
            document["witness"] = self._entry(witness)
        for name in SITE_NAMES:
            process = self.processes.get(name)
            if process is not None and process.pid is not None:
                document["sites"][name] = self._entry(process)
        _write_atomically(self.cluster_file, json.dumps(document, indent=2) + "\n")

    def recorded_running(self) -> list[tuple[str, int]]:
        """(name, pid) of processes recorded in cluster.json that still run with this directory's config."""
        try:
            document = self.cluster
        except (OSError, ValueError):
            return []
        entries = [(WITNESS, document.get("witness"))] + list((document.get("sites") or {}).items())
        return [
            (name, entry["pid"])
            for name, entry in entries
            if entry and entry.get("pid") and same_process(entry["pid"], entry["config"])
        ]

    # ------------------------------------------------------------ processes
    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        root = str(Path(replicator.__file__).resolve().parent.parent)
        paths = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            environment["PYTHONPATH"] = os.pathsep.join([root, *paths])
        environment.setdefault("PYTHONUNBUFFERED", "1")
        return environment

    def command(self, name: str) -> list[str]:
        process = self.processes[name]
        return [self.python, "-m", process.module, "--config", str(process.config)]

    def shell_command(self, name: str) -> str:
        """A shell line that starts `name` again by hand (not recorded in cluster.json)."""
        command = " ".join(shlex.quote(part) for part in self.command(name))
        root = str(Path(replicator.__file__).resolve().parent.parent)
        return f"cd {shlex.quote(str(self.directory))} && PYTHONPATH={shlex.quote(root)} {command}"

    def is_running(self, name: str) -> bool:
        process = self.processes.get(name)
        if process is None or process.pid is None:
            return False
        if process.popen is not None:
            # Our own child: alive until reaped, so its pid cannot be another's. Not by its command
            # line: right after Popen returns, /proc/<pid>/cmdline can still read empty while the
            # exec completes (the resync benchmark saw b "exit" the moment it was started, under load).
            return process.popen.poll() is None
        return same_process(process.pid, process.config)

    def start_process(self, name: str, wait: bool = True) -> int:
        """Start one process (witness, a or b), record it, and wait until it is healthy."""
        if not self.processes:
            self.configure()
        process = self.processes[name]
        if self.is_running(name):
            raise LocalClusterError(f"{name} already runs (pid {process.pid})")
        with process.log.open("ab") as log:
            process.popen = subprocess.Popen(
                self.command(name),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self._environment(),
                start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it stops the rest
            )
        process.pid = process.popen.pid
        if name not in self.started:
            self.started.append(name)
        self._write_cluster()
        if wait:
            self.wait_healthy(name)
        return process.pid

    def wait_healthy(self, name: str, timeout_s: float | None = None) -> None:
        """Wait for gRPC health "" SERVING; raise LocalClusterError with the log tail otherwise."""
        process = self.processes[name]
        timeout_s = self.health_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if process.popen is not None and process.popen.poll() is not None:
                raise LocalClusterError(
                    f"{name} (pid {process.pid}) exited with code {process.popen.returncode} during start-up; "
                    f"last lines of {process.log}:\n{_tail(process.log)}"
                )
            if grpc_health(process.grpc, timeout_s=0.5, tls=process.health_tls) == "SERVING":
                return
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"{name} (pid {process.pid}) did not report healthy on {process.grpc} within {timeout_s:.0f} s; "
                    f"last lines of {process.log}:\n{_tail(process.log)}"
                )
            time.sleep(0.05)

    def start(self, sites: bool = True) -> LocalCluster:
        """Configure (or reuse), start the witness then the sites, wait until each is healthy.

        On any failure every process started here is stopped before the error propagates.
        """
        try:
            self.configure()
            running = self.recorded_running()
            if running:
                listed = ", ".join(f"{n} (pid {p})" for n, p in running)
                raise LocalClusterError(
                    f"{self.directory} already has running processes: {listed}; "
                    f"run `replicator-local down --dir {self.directory}` first"
                )
            if sites and not site_daemon_available():
                raise LocalClusterError(
                    f"the site daemon module {SITE_MODULE} is not available in this installation; "
                    f"start with sites=False (--no-sites) for the witness alone"
                )
            self._write_cluster()
            self.start_process(WITNESS, wait=True)
            if sites:
                for name in SITE_NAMES:
                    self.start_process(name, wait=False)
                for name in SITE_NAMES:
                    self.wait_healthy(name)
        except BaseException:
            self.stop()
            raise
        return self

    def send_signal(self, name: str, signum: int) -> bool:
        """Send `signum` to `name` if it is still the process we recorded. True if sent."""
        process = self.processes.get(name)
        if process is None or process.pid is None or not self.is_running(name):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)
            return True
        return False

    def _wait_exit(self, name: str, timeout_s: float) -> bool:
        process = self.processes[name]
        if process.popen is not None:
            try:
                process.popen.wait(timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while self.is_running(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop_process(self, name: str, timeout_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (default stop_timeout_s)."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.send_signal(name, signal.SIGTERM) and not self._wait_exit(name, timeout_s):
            self.send_signal(name, signal.SIGKILL)
            self._wait_exit(name, 5.0)
        process = self.processes.get(name)
        if process is not None and process.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(0.1)  # reap

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` (SIGKILL by default) and wait for the process to exit."""
        if self.send_signal(name, signum):
            self._wait_exit(name, self.stop_timeout_s)

    def restart(self, name: str) -> int:
        """Stop `name` if it runs, start it again with the same configuration, wait until healthy."""
        if not self.processes:
            self.configure()
        self.stop_process(name)
        return self.start_process(name, wait=True)

    def stop(self) -> None:
        """Stop every process this object started: the sites first, then the witness."""
        order = [n for n in SITE_NAMES if n in self.started] + [n for n in self.started if n not in SITE_NAMES]
        for name in order:
            self.send_signal(name, signal.SIGTERM)
        for name in order:
            if not self._wait_exit(name, self.stop_timeout_s):
                self.send_signal(name, signal.SIGKILL)
                self._wait_exit(name, 5.0)
        for name in order:
            process = self.processes[name]
            if process.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(0.1)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ------------------------------------------------------------------ command line


def _summary(cluster: LocalCluster) -> str:
    lines = [f"replicator-local: cluster up in {cluster.directory}"]
    for name, process in cluster.processes.items():
        if process.pid is None:
            continue
        extra = "  ".join(f"{k} {v}" for k, v in process.extra.items())
        lines.append(f"  {name:<8} pid {process.pid:<7}  grpc {process.grpc}  {extra}  log {process.log}")
    flags = ""
    if cluster.client_tls is not None:
        tls = cluster.client_tls
        flags = " ".join(
            f"{option} {shlex.quote(str(path))}"
            for option, path in (("--ca", tls.ca_file), ("--cert", tls.cert_file), ("--key", tls.key_file))
        )
        lines.append(f"mutual TLS on every link; client certificate: {flags}")
        flags = " " + flags
    nbd = {n: cluster.processes[n].extra.get("nbd", "") for n in SITE_NAMES if n in cluster.started}
    if nbd and all(nbd.values()):
        scheme = "nbds" if cluster.client_tls is not None else "nbd"
        volumes = _volume_names(cluster) or ["VOLUME"]
        lines.append("NBD exports (one per block volume):")
        for volume in volumes:
            for name, address in nbd.items():
                lines.append(f"  {volume:<12} site {name}:     {scheme}://{address}/{volume}")
            lines.append(f"  {volume:<12} multipath:  nbd://127.0.0.1:10809/{volume}")
        tls = ""
        if cluster.client_tls is not None:
            files = cluster.client_tls
            tls = f" --ca {files.ca_file} --cert {files.cert_file} --key {files.key_file}"
        lines.append(f"  multipath:  replicator-nbd-multipath --sites {' '.join(nbd.values())}{tls} --listen 127.0.0.1:10809")
    if any(n in cluster.started for n in SITE_NAMES):
        a = cluster.processes[SITE_NAMES[0]].grpc
        lines.append(f"try:  replicatorctl --endpoint {a}{flags} status")
        s3 = cluster.processes[SITE_NAMES[0]].extra.get("s3")
        if s3 and cluster.s3_credentials_file.is_file():
            access, secret = cluster.s3_credentials()
            ca = f" --ca-bundle {shlex.quote(str(cluster.client_tls.ca_file))}" if cluster.client_tls else ""
            lines.append(
                f"      AWS_ACCESS_KEY_ID={access} AWS_SECRET_ACCESS_KEY={secret} "
                f"aws --endpoint-url {s3}{ca} s3 ls   (S3 at every site; keys in {cluster.s3_credentials_file})"
            )
    lines.append(f"      replicatorctl --witness {cluster.processes[WITNESS].grpc}{flags} witness status")
    lines.append("Ctrl-C (or SIGTERM) stops everything started here.")
    return "\n".join(lines)


def _volume_names(cluster: LocalCluster, limit: int = 20) -> list[str]:
    """The block volumes the pair holds now (for the NBD URIs), or [] if the sites do not answer."""
    from replicator.client import Client, ClientError, RetryPolicy

    endpoints = [cluster.processes[n].grpc for n in SITE_NAMES if n in cluster.started]
    try:
        with Client(endpoints, tls=cluster.client_tls, retry=RetryPolicy(attempts_max=2, call_timeout_ms=2000)) as client:
            return [volume.name for volume in client.list_volumes()][:limit]
    except ClientError:
        return []


class _Stop(Exception):
    pass


def _up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.dir,
        health_timeout_s=args.health_timeout,
        stop_timeout_s=args.stop_timeout,
        tls=args.tls,
        peer_timeout_ms=args.peer_timeout_ms,
        timeouts=args.timeouts,
    )

    def on_term(signum: int, frame: object) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        cluster.start(sites=not args.no_sites)
        print(_summary(cluster), flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for name in cluster.started:
                process = cluster.processes[name]
                if name not in reported and process.popen is not None and process.popen.poll() is not None:
                    reported.add(name)
                    print(
                        f"replicator-local: {name} (pid {process.pid}) exited with code {process.popen.returncode}; "
                        f"start it again with: {cluster.shell_command(name)}",
                        file=sys.stderr,
                        flush=True,
                    )
    except (KeyboardInterrupt, _Stop):
        print("replicator-local: stopping", file=sys.stderr, flush=True)
        return 0
    except LocalClusterError as error:
        print(f"replicator-local: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def _read_cluster(directory: Path) -> dict[str, Any]:
    path = directory / "cluster.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise LocalClusterError(f"{path}: no such file (nothing was started in {directory})") from None
    except (OSError, ValueError) as error:
        raise LocalClusterError(f"{path}: cannot read: {error}") from None
    if not isinstance(document, dict):
        raise LocalClusterError(f"{path}: not a JSON object")
    return document


def _recorded_tls(document: dict[str, Any]) -> TlsFiles | None:
    """The client certificate cluster.json records for a TLS deployment, or None."""
    tls = document.get("tls")
    if not tls:
        return None
    try:
        return TlsFiles(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]))
    except (KeyError, TypeError):
        raise LocalClusterError(f'cluster.json: bad "tls" entry {tls!r} (wants ca, cert, key)') from None


def _recorded(directory: Path, document: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    if document is None:
        document = _read_cluster(directory)
    entries = []
    if document.get("witness"):
        entries.append((WITNESS, document["witness"]))
    entries += list((document.get("sites") or {}).items())
    return entries


def _down(args: argparse.Namespace) -> int:
    entries = _recorded(Path(args.dir).resolve())
    running = [(n, e) for n, e in entries if e.get("pid") and same_process(e["pid"], e["config"])]
    for name, entry in entries:
        if (name, entry) not in running:
            print(f"{name}: not running (pid {entry.get('pid')} is gone or is another process)")
    # sites first, then the witness
    running.sort(key=lambda item: item[0] == WITNESS)
    for _, entry in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.stop_timeout
    for name, entry in running:
        while same_process(entry["pid"], entry["config"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if same_process(entry["pid"], entry["config"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGKILL)
            print(f"{name}: pid {entry['pid']} killed (SIGKILL after {args.stop_timeout:.0f} s)")
        else:
            print(f"{name}: pid {entry['pid']} stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    document = _read_cluster(directory)
    entries = _recorded(directory, document)
    tls = _recorded_tls(document)
    rows = []
    for name, entry in entries:
        running = bool(entry.get("pid")) and same_process(entry["pid"], entry["config"])
        health = grpc_health(entry["grpc"], timeout_s=1.0, tls=tls) if running else "-"
        # Liveness above; readiness: whether a site serves data (its ObjectService health).
        ready = "-"
        if running and name != WITNESS:
            data = grpc_health(entry["grpc"], timeout_s=1.0, service="replicator.v1.ObjectService", tls=tls)
            ready = "ready" if data == "SERVING" else "not-ready"
        rows.append(
            {"name": name, "pid": entry.get("pid"), "running": running, "health": health, "ready": ready, **entry}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "running" if row["running"] else "stopped"
            print(
                f"{row['name']:<8} pid {row['pid']!s:<7} {state:<8} {row['health']:<12} {row['ready']:<10} "
                f"grpc {row['grpc']}"
            )
    return 0 if rows and all(r["running"] and r["health"] == "SERVING" for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replicator-local", description="Run a witness and two sites on 127.0.0.1 (demo, tests)."
    )
    parser.add_argument("--version", action="version", version=f"replicator-local {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="configure (or reuse) DIR, start everything, stay in the foreground")
    up.add_argument("--dir", required=True, help="directory for configs, data, logs and cluster.json")
    up.add_argument("--no-sites", action="store_true", help="start the witness only")
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every link (gRPC, site link, witness): a CA and certificates in DIR/tls/",
    )
    up.add_argument("--health-timeout", type=float, default=30.0, help="seconds to wait for each process")
    up.add_argument(
        "--peer-timeout-ms",
        type=int,
        default=None,
        help=f"the sites' peer timeout (default {DEMO_SITE_SETTINGS['peer_timeout_ms']} ms; more on a loaded machine)",
    )
    up.add_argument(
        "--timeouts",
        choices=TIMEOUT_PROFILES,
        default="demo",
        help="demo: short timeouts for loopback (the default); production: every timeout at the configuration's"
        " shipped default, as a real deployment runs",
    )
    up.add_argument("--stop-timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    down = commands.add_parser("down", help="stop the processes recorded in DIR/cluster.json")
    down.add_argument("--dir", required=True)
    down.add_argument("--stop-timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    status = commands.add_parser("status", help="show the processes recorded in DIR/cluster.json")
    status.add_argument("--dir", required=True)
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "down":
            return _down(args)
        return _status(args)
    except LocalClusterError as error:
        print(f"replicator-local: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
