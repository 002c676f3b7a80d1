"""Which backend and devices a run uses, and what a config's compute dtype needs from them.

`pip install -e '.[cuda12]'` or `'.[tpu]'` adds JAX's GPU or TPU plugin; where the plugin finds no
device JAX falls back to the CPU, which `fallback_note` says in words instead of leaving a
user to wonder why a "GPU run" takes hours.
"""
from __future__ import annotations

import collections
import importlib.util

import jax

# JAX's accelerator plugins, by the module each installs (`jax[cuda12]`, `jax[cuda13]`,
# `jax[tpu]`), and the backend each gives when it finds its device.
PLUGINS = {"jax_plugins.xla_cuda12": "gpu", "jax_plugins.xla_cuda13": "gpu", "libtpu": "tpu"}
# bfloat16 arithmetic in hardware on NVIDIA GPUs: compute capability 8.0 (Ampere) and newer.
BF16_MIN_CAPABILITY = (8, 0)


def describe(devices=None) -> str:
  """One line: the backend, the devices by kind and how many processes share them."""
  devices = jax.devices() if devices is None else list(devices)
  kinds = collections.Counter(d.device_kind for d in devices)
  listed = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
  processes = len({d.process_index for d in devices})
  return (f"devices: {listed} (backend {devices[0].platform}, {processes} "
          f"process{'es' if processes > 1 else ''})")


def installed_plugins() -> list[str]:
  """The backends of the accelerator plugins installed in this environment."""
  found = []
  for module, backend in PLUGINS.items():
    try:
      spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is not there
      spec = None
    if spec is not None and backend not in found:
      found.append(backend)
  return found


def fallback_note(platform: str | None = None, plugins: list[str] | None = None) -> str | None:
  """A sentence when an accelerator plugin is installed but the run is on the CPU, else None."""
  platform = jax.default_backend() if platform is None else platform
  plugins = installed_plugins() if plugins is None else plugins
  if platform != "cpu" or not plugins:
    return None
  names = " and ".join(p.upper() for p in plugins)
  return (f"JAX's {names} plugin is installed but found no {names} device, so this run uses the "
          "CPU (check nvidia-smi / CUDA_VISIBLE_DEVICES on a GPU machine, or that this is a TPU "
          "VM); JAX_PLATFORMS=cpu silences this.")


def _capability(device) -> tuple[int, ...] | None:
  value = getattr(device, "compute_capability", None)
  if not value:
    return None
  try:
    return tuple(int(x) for x in str(value).split("."))
  except ValueError:
    return None


def check_dtype(dtype: str, devices=None) -> str | None:
  """Raises ValueError when the devices cannot compute in `dtype` (model.dtype); returns a
  warning when they can but slowly (bfloat16 on a CPU is emulated), else None."""
  devices = jax.devices() if devices is None else list(devices)
  if dtype != "bfloat16":
    return None
  device = devices[0]
  if device.platform == "cpu":
    return ("model.dtype='bfloat16' on the CPU is emulated and slower than float32 (fine for "
            "checking a config, not for speed); --config.model.dtype=float32 for CPU runs.")
  capability = _capability(device)
  if device.platform == "gpu" and capability is not None and capability < BF16_MIN_CAPABILITY:
    need = ".".join(map(str, BF16_MIN_CAPABILITY))
    raise ValueError(
        f"model.dtype='bfloat16' needs an NVIDIA GPU of compute capability {need} or newer "
        f"(Ampere); this run's {device.device_kind} is {'.'.join(map(str, capability))}: use "
        "--config.model.dtype=float32.")
  return None


def startup_lines(config) -> list[str]:
  """What a run prints before it starts: the devices, and any fallback or dtype warning.

  Raises ValueError (from `check_dtype`) when the config's dtype cannot run here.
  """
  lines = [describe()]
  note = fallback_note()
  if note:
    lines.append(f"warning: {note}")
  warning = check_dtype(config.model.get("dtype", "float32"))
  if warning:
    lines.append(f"warning: {warning}")
  return lines
