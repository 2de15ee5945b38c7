"""The chaos suite: real daemons, real faults, the simulator's checkers.

    python -m chaos run --seed 7 --nemeses kill,partition-blackhole --duration 20 --out /tmp/chaos

Modules: `proxies` (fault proxies in one asyncio thread), `harness` (a local
deployment with a proxy on every link), `workload` (clients recording a
history), `nemeses` (the faults), `analysis` (checkers, RTO, resync times),
`report` (summary.json, summary.md, timeline.png), `run` (one whole run).
See docs/chaos.md.
"""
