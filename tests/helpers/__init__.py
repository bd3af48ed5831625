"""Helpers shared by the tests: paths, training launches, mixer checks, the tensor-parallel worker."""
