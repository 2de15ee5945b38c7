"""Daemons (site, witness) and their shared helpers.

- `logs`: one structured JSON event a line on stderr.
- `metrics`: a dependency-free Prometheus registry and a small HTTP server
  for `/metrics` and `/healthz`.
- `runner`: uvloop, SIGTERM/SIGINT handling and staged shutdown.
- `witness`: the witness daemon (`replicator-witness`).
- `site`: the site daemon (`replicatord`).
"""
