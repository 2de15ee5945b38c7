"""Compiled Cython modules (built from native/*.pyx by setup.py)."""
