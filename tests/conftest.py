"""Test set-up: 8 fake CPU devices so sharded code paths run on a laptop/CI.

XLA's backend optimisation level 0 roughly halves compile time, which dominates these small
tests; results stay within the tests' tolerances.
"""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
