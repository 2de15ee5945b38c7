"""Pure-Python twins of the Cython modules in native/ (same API, same results)."""
