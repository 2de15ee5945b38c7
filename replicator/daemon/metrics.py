"""A tiny Prometheus registry and an asyncio HTTP server for `/metrics` and `/healthz`.

No dependency: Counter, Gauge and Histogram with labels, rendered in the text
exposition format 0.0.4.

    registry = Registry()
    requests = registry.counter("replicator_witness_requests_total", "Requests by verdict", ("request", "verdict"))
    requests.labels(request="arbitrate", verdict="granted").inc()
    epoch = registry.gauge("replicator_witness_pair_epoch", "Current epoch", ("pair",))
    epoch.labels("pair-1").set(3)
    latency = registry.histogram("replicator_witness_request_seconds", "Request latency")
    latency.observe(0.002)
    registry.add_collector(refresh)      # called before every scrape (update gauges from state)
    server = await start_metrics_server(registry, "127.0.0.1:0", health=lambda: True)
    server.address                       # "127.0.0.1:PORT"
    await server.stop()

The server answers GET (and HEAD) `/metrics`, `/healthz` (liveness: 200 while
the process runs, even when the site does not serve) and, when given a
`ready` callable, `/readyz` (readiness: 200 while the site serves clients,
503 otherwise, with the reason in the body) only, reads at
most `REQUEST_BYTES_MAX` bytes of request head within `REQUEST_TIMEOUT_S`,
and closes every connection after one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from replicator.config import parse_address

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "REQUEST_BYTES_MAX",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "Registry",
    "start_metrics_server",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BYTES_MAX = 8192
REQUEST_TIMEOUT_S = 5.0


def _check_name(name: str) -> str:
    ok = name and (name[0].isalpha() or name[0] in "_:") and all(c.isalnum() or c in "_:" for c in name)
    if not ok or not name.isascii():
        raise ValueError(f"invalid metric or label name {name!r}")
    return name


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = _check_name(name)
        self.documentation = documentation
        self.labelnames = tuple(_check_name(n) for n in labelnames)
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"{name}: duplicate label names {self.labelnames}")
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, ...]:
        if args and kwargs:
            raise ValueError(f"{self.name}: give label values by position or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels {sorted(kwargs)} do not match {list(self.labelnames)}")
            args = tuple(kwargs[n] for n in self.labelnames)
        if len(args) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(args)}")
        return tuple(str(getattr(a, "name", a)) if not isinstance(a, str) else a for a in args)

    def labels(self, *args: Any, **kwargs: Any) -> Any:
        """The child series for these label values (created at first use)."""
        key = self._key(args, kwargs)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, *args: Any, **kwargs: Any) -> None:
        key = self._key(args, kwargs)
        with self._lock:
            self._children.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._children.clear()

    def _unlabelled(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name}: has labels {list(self.labelnames)}, use .labels(...)")
        return self.labels()

    def _new_child(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _samples(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.documentation)}", f"# TYPE {self.name} {self.kind}"]
        lines += self._samples()
        return "\n".join(lines) + "\n"


class _Value:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._lock = threading.Lock()


class _CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount


class _GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value -= amount


class Counter(_Metric):
    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def value(self, *args: Any, **kwargs: Any) -> float:
        return float(self.labels(*args, **kwargs).value)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._children.items())
        return [f"{self.name}{_label_text(self.labelnames, k)} {_format_value(c.value)}" for k, c in items]


class Gauge(_Metric):
    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    def value(self, *args: Any, **kwargs: Any) -> float:
        return float(self.labels(*args, **kwargs).value)

    _samples = Counter._samples


class _HistogramChild:
    __slots__ = ("_lock", "buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[index] += 1
                    break


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        if "le" in self.labelnames:
            raise ValueError(f"{name}: 'le' is reserved in a histogram")
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {buckets!r}")
        self.buckets = bounds

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._children.items())
        lines = []
        for key, child in items:
            with child._lock:
                counts, total, count = list(child.counts), child.sum, child.count
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                labels = _label_text(self.labelnames, key, ("le", _format_value(bound)))
                lines.append(f"{self.name}_bucket{labels} {cumulative}")
            labels = _label_text(self.labelnames, key, ("le", "+Inf"))
            lines.append(f"{self.name}_bucket{labels} {count}")
            lines.append(f"{self.name}_sum{_label_text(self.labelnames, key)} {_format_value(total)}")
            lines.append(f"{self.name}_count{_label_text(self.labelnames, key)} {count}")
        return lines


class Registry:
    """A set of metrics rendered together; collectors run before each render."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> Any:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        return self.register(Counter(name, documentation, labelnames))  # type: ignore[no-any-return]

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self.register(Gauge(name, documentation, labelnames))  # type: ignore[no-any-return]

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self.register(Histogram(name, documentation, labelnames, buckets))  # type: ignore[no-any-return]

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def add_collector(self, collector: Callable[[], None]) -> None:
        """`collector()` runs before every render (e.g. to set gauges from current state)."""
        self._collectors.append(collector)

    def render(self) -> str:
        for collector in self._collectors:
            collector()
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(m.render() for m in metrics)


# --------------------------------------------------------------------------
# HTTP


class MetricsServer:
    def __init__(self, server: asyncio.AbstractServer, address: str, port: int) -> None:
        self._server = server
        self.address = address
        self.port = port

    async def stop(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _read_head(reader: asyncio.StreamReader) -> bytes | int:
    """The request head (up to the blank line), or an HTTP status to answer with."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) >= REQUEST_BYTES_MAX:
            return 431
        chunk = await reader.read(REQUEST_BYTES_MAX - len(head))
        if not chunk:
            return 400 if head else 0
        head += chunk
    return head


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    registry: Registry,
    health: Callable[[], bool] | None,
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> None:
    try:
        try:
            head = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT_S)
        except TimeoutError:
            head = 408
        if head == 0:
            return
        status, body, content_type, method = 200, b"", "text/plain; charset=utf-8", "GET"
        if isinstance(head, int):
            status = head
        else:
            request_line = head.split(b"\n", 1)[0].strip().split()
            if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
                status = 400
            else:
                method = request_line[0].decode("ascii", "replace")
                path = request_line[1].split(b"?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status = 405
                elif path == b"/metrics":
                    try:
                        body, content_type = registry.render().encode(), CONTENT_TYPE
                    except Exception as error:  # a collector failed: say so, do not drop the connection
                        status, body = 500, f"collector failed: {error}\n".encode()
                elif path == b"/healthz":
                    healthy = True if health is None else bool(health())
                    status, body = (200, b"ok\n") if healthy else (503, b"unhealthy\n")
                elif path == b"/readyz" and ready is not None:
                    serving, text = ready()
                    status, body = (200 if serving else 503), (text.rstrip("\n") + "\n").encode()
                else:
                    status = 404
        if status != 200 and not body:
            body = f"{status} {_REASONS.get(status, '')}\n".encode()
        headers = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(headers if method == "HEAD" else headers + body)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def start_metrics_server(
    registry: Registry,
    listen: str = "127.0.0.1:0",
    health: Callable[[], bool] | None = None,
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` (liveness: the process answers) and, given `ready`, `/readyz`
    (readiness: 200 while `ready()` says serving, else 503; the body says why) on `listen`
    ("host:port"; port 0 picks one)."""
    host, port = parse_address(listen)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, registry, health, ready), host, port, limit=REQUEST_BYTES_MAX * 2
    )
    bound_port = server.sockets[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    return MetricsServer(server, f"{shown_host}:{bound_port}", bound_port)
