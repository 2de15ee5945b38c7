"""Fault injection, simulation and correctness checking for Replicator."""
