"""FLOPs of a compiled step and model FLOPs utilisation (MFU).

MFU = FLOPs of one step x steps/s / (peak FLOP/s of the devices). The step's FLOPs are XLA's
own count for the compiled program (`cost_analysis`), per device for an SPMD-partitioned
program; with no rematerialisation in the model this is the model's forward + backward FLOPs.
Peak rates are dense bf16 per chip from the vendors' data sheets; pass `config.peak_flops` for
anything else (or for fp32 runs, whose peak is lower).
"""
from __future__ import annotations

# device_kind substring (lower case) -> dense bf16 FLOP/s per device.
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "tpu v6": 918e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
    "tpu v3": 123e12,
}


def step_flops(compiled) -> float | None:
  """FLOPs per device of one call of a compiled function (`jit(...).lower(...).compile()`)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends have no cost model
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per partition
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def peak_flops(device, override: float | None = None) -> float | None:
  """Peak FLOP/s of one `device`: `override` if given, else the table entry for its kind."""
  if override:
    return float(override)
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, value in PEAK_FLOPS.items():
    if name in kind:
      return value
  return None


def mfu(flops_per_step: float | None, steps_per_sec: float, peak: float | None) -> float | None:
  """Fraction of the per-device peak that the step's FLOPs use; None when either is unknown."""
  if not flops_per_step or not peak:
    return None
  return flops_per_step * steps_per_sec / peak
