"""Model size names ("mu/4", "B/16", "So400m/14", "S") -> transformer hyper-parameters.

Widths follow big_vision (`big_vision/models/vit.py:decode_variant`), plus a micro size "mu"
used by tests and the CPU demo.
"""
from __future__ import annotations

import re

# name -> (width, depth, mlp_dim, num_heads)
SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
}

OVERRIDABLE = ("width", "depth", "mlp_dim", "num_heads")

_VARIANT = re.compile(r"^(?P<size>[A-Za-z0-9]+)(?:/(?P<patch>\d+))?$")


def decode_variant(variant: str, *, overrides=None, need_patch: bool = False) -> dict:
  """Parses a size name into transformer hyper-parameters.

  Args:
    variant: "<size>" (text towers) or "<size>/<patch>" (image towers), e.g. "mu/4", "B/16".
    overrides: optional mapping with any of width, depth, mlp_dim, num_heads; `None` values are
      ignored so a config can list every field and set only some.
    need_patch: raise if the variant has no "/<patch>" part (image towers need one).

  Returns:
    dict(width, depth, mlp_dim, num_heads) plus patch_size=(p, p) when a patch was given.
  """
  match = _VARIANT.match(str(variant).strip())
  if not match or match.group("size") not in SIZES:
    raise ValueError(
        f"model variant {variant!r} is not known; use one of {sorted(SIZES)} "
        "optionally followed by '/<patch>' (e.g. 'B/16', 'mu/4').")
  width, depth, mlp_dim, num_heads = SIZES[match.group("size")]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if match.group("patch") is not None:
    patch = int(match.group("patch"))
    if patch <= 0:
      raise ValueError(f"model variant {variant!r}: the patch size must be positive.")
    out["patch_size"] = (patch, patch)
  elif need_patch:
    raise ValueError(f"image variant {variant!r} needs a patch size, e.g. '{variant}/16'.")
  for key, value in dict(overrides or {}).items():
    if key not in OVERRIDABLE:
      raise ValueError(f"unknown model override {key!r}; allowed: {OVERRIDABLE}.")
    if value is not None:
      if int(value) < 1:
        raise ValueError(f"model variant {variant!r}: {key}={value} must be >= 1; leave it "
                         "unset (None) to keep the variant's.")
      out[key] = int(value)
  if out["width"] % out["num_heads"]:
    raise ValueError(
        f"variant {variant!r}: width {out['width']} is not divisible by num_heads "
        f"{out['num_heads']}; override one of them.")
  return out


def size_name(width: int, depth: int, mlp_dim: int, num_heads: int) -> str | None:
  """The name in SIZES with exactly these hyper-parameters (e.g. OpenAI CLIP B/32's text tower,
  (512, 12, 2048, 8), is 'M'), or None. Checkpoint readers label a tower with it and pass the
  four numbers as overrides either way."""
  sizes = (int(width), int(depth), int(mlp_dim), int(num_heads))
  return next((name for name, s in SIZES.items() if s == sizes), None)
