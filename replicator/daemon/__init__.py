"""Daemons (site, witness) and their shared helpers.

- `logs`: one structured JSON event a line on stderr.
- `metrics`: a dependency-free Prometheus registry and a small HTTP server
  for `/metrics` and `/healthz`.
- `runner`: uvloop, SIGTERM/SIGINT handling and staged shutdown.
- `witness`: the witness daemon (`replicator-witness`).
- `site`: the site daemon (`replicatord`).
- `ops`: resync progress and the event stream (`replicatorctl events`).

Importing this package keeps gRPC's C core from printing its own non-JSON
lines (GRPC_VERBOSITY=NONE unless set): the daemons' stderr is their JSON log.
It must happen before grpc is first imported, hence here.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
