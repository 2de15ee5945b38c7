"""Fault proxies (`replicator.transport.faultproxy.FaultProxy`) run in one background asyncio thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from replicator.transport.faultproxy import FaultProxy

T = TypeVar("T")
CALL_TIMEOUT_S = 10.0


class ProxyHub:
    """Owns an event loop thread and every proxy of a run; `call` runs a control in that loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: dict[str, FaultProxy] = {}
        self._thread = threading.Thread(target=self._serve, name="chaos-proxies", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def add(self, name: str, target: tuple[str, int], seed: int) -> FaultProxy:
        async def make() -> FaultProxy:
            proxy = FaultProxy(target, seed=seed)
            await proxy.start()
            return proxy

        proxy = asyncio.run_coroutine_threadsafe(make(), self.loop).result(CALL_TIMEOUT_S)
        self.proxies[name] = proxy
        return proxy

    def address(self, name: str) -> str:
        host, port = self.proxies[name].address
        return f"{host}:{port}"

    def call(self, name: str, control: Callable[[FaultProxy], T]) -> T:
        """Run `control(proxy)` in the proxies' loop and return its result."""
        proxy = self.proxies[name]

        async def run() -> T:
            return control(proxy)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(CALL_TIMEOUT_S)

    def heal_all(self, cut: bool = False) -> None:
        for name in self.proxies:
            self.call(name, lambda p: (p.heal(), p.cut() if cut else None))

    def stats(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "connections": p.stats.connections,
                "refused": p.stats.refused,
                "cuts": p.stats.cuts,
                "corruptions": p.stats.corruptions,
                "bytes_forwarded": p.stats.bytes_forwarded,
                "bytes_blackholed": p.stats.bytes_blackholed,
            }
            for name, p in self.proxies.items()
        }

    def close(self) -> None:
        async def close_all() -> None:
            for proxy in self.proxies.values():
                try:
                    await asyncio.wait_for(proxy.close(), 5)
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
