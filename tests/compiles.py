"""Counting XLA compilations in a test, with or without the persistent compilation cache.

A program the persistent cache (conftest.py) already holds is loaded instead of compiled, so a
test that counts compilations counts those loads as well: either means jit missed its
in-memory cache and built an executable.
"""
import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compiles():
  """Yields a list that gets one entry per executable compiled or loaded from the cache."""
  seen = []

  def on_duration(event, *_, **__):
    if event == BACKEND_COMPILE:
      seen.append(event)

  def on_event(event, *_, **__):
    if event == CACHE_HIT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
