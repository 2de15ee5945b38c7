"""Generated protobuf and gRPC modules (package replicator.v1), built from proto/ by setup.py."""
