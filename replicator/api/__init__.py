"""gRPC APIs of a site and of the witness: servicers over abstract backends.

- backend.py: the SiteBackend protocol the daemon implements (and the
  dataclasses it returns); errors.py: the typed errors it raises.
- objects.py, blocks.py, admin.py: the site's servicers; keys.py: the key
  layout of objects, blocks and volumes and the validation of names.
- witness.py: the witness servicer over a WitnessBackend protocol.
- server.py: start_site_server / start_witness_server (TLS, health).
- fake.py: an in-memory SiteBackend and WitnessBackend for tests.
"""
