"""Out-of-memory errors of training, re-raised with the config knobs that use less memory.

XLA reports a device running out of memory as a runtime error whose message starts with
RESOURCE_EXHAUSTED (at compile time when the program cannot fit at all, at run time when an
allocation fails); the message says how much was asked for but not what to change.
"""
from __future__ import annotations

import contextlib

import jax

# What XLA's out-of-memory errors say, on CPU, GPU and TPU alike.
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


class OutOfMemoryError(ValueError):
  """A device ran out of memory while training; the message names the knobs that need less."""


def _runtime_errors() -> tuple[type, ...]:
  kinds = [jax.errors.JaxRuntimeError]
  try:  # older jaxlibs name it XlaRuntimeError (newer ones alias it)
    from jaxlib.xla_client import XlaRuntimeError  # pylint: disable=g-import-not-at-top
    kinds.append(XlaRuntimeError)
  except ImportError:
    pass
  return tuple(kinds)


def is_oom(error: BaseException) -> bool:
  """Whether `error` is XLA's out-of-memory error."""
  return isinstance(error, _runtime_errors()) and any(m in str(error) for m in _OOM_MARKERS)


def oom_message(error: BaseException, what: str, config) -> str:
  """One paragraph: what ran out (the first line of XLA's message) and the knobs to turn."""
  first = next((line.strip() for line in str(error).splitlines() if line.strip()),
               type(error).__name__)
  first = first if len(first) <= 300 else first[:297] + "..."
  model = config.get("model") or {}
  image = model.get("image") or {}
  return (
      f"training: out of device memory while {what} ({first}). Each of these needs less "
      f"memory per device: a smaller --config.batch_size (now {config.get('batch_size')}); "
      f"--config.model.dtype=bfloat16 (now {model.get('dtype', 'float32')}); "
      "--config.loss_impl=chunked with a smaller --config.loss_chunk, or --config.loss_impl=ring "
      f"(now {config.get('loss_impl', 'full')}); parameters and optimizer state split over the "
      "devices with --config.mesh.fsdp (and config.sharding_rules); a smaller "
      f"--config.model.image.variant (now {image.get('variant')}).")


@contextlib.contextmanager
def oom_hint(what: str, config):
  """Re-raises XLA's out-of-memory errors inside the block as `OutOfMemoryError` (what ran out
  and the knobs to turn); other errors pass unchanged."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # only the OOM kind is replaced
    if is_oom(e):
      raise OutOfMemoryError(oom_message(e, what, config)) from e
    raise
