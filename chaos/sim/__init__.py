"""Deterministic simulation of the real protocol cores (see world.py)."""
