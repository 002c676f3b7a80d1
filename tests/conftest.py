"""Test set-up: 8 fake CPU devices so sharded code paths run on a laptop/CI.

XLA's backend optimisation level 0 roughly halves compile time, which dominates these small
tests; results stay within the tests' tolerances. A persistent compilation cache, fresh for
each test session and shared with the processes tests start (the CLI, the demo, the notebook,
multi-process runs), compiles each program once; tests that count compilations count cache
loads too (compiles.py).
"""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    # XLA:CPU's older loop emitters compile these small programs in about a third of the time
    # (tests/test_ema.py + test_remat.py: 103 -> 66 CPU-seconds).
    " --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set in the first pytest process, so pytest-xdist workers (started later) share it.
  _CACHE = tempfile.mkdtemp(prefix="siglip_fair_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
