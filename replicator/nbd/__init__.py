"""NBD front-end: each site serves its block volumes as NBD exports (server.py), and hosts join the
two sites' exports into one device with the multipath endpoint (multipath.py). See docs/nbd.md."""
