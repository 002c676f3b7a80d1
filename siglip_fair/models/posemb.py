"""Resampling a learnt ViT position embedding to another patch grid ("high-res fine-tuning").

A checkpoint trained at 224 px with patch 16 holds a 14x14 grid of embeddings; running it at
384 px needs 24x24. big_vision (`models/vit.py:resample_posemb`) reshapes the [1, N, D] table to
its square [g, g, D] grid and zooms it with `scipy.ndimage.zoom(order=1)`: linear interpolation
whose output corners land on the input corners. method='zoom' reproduces that exactly (so a
model loaded here equals the one big_vision would run); any `jax.image.resize` method
('bilinear', 'bicubic', ...; half-pixel centres, no antialiasing) can be asked for instead.
"""
from __future__ import annotations

import math

import jax
import numpy as np

METHODS = ("zoom", "nearest", "linear", "bilinear", "cubic", "bicubic", "lanczos3", "lanczos5")


def square_grid(num_positions: int) -> int | None:
  """g with g*g == num_positions, else None (big_vision's tables are square)."""
  g = math.isqrt(num_positions)
  return g if g * g == num_positions else None


def _zoom_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Linear interpolation along `axis` to `size` samples, corners aligned (scipy's zoom,
  order=1, grid_mode=False: output i samples input i * (n-1) / (size-1))."""
  n = x.shape[axis]
  if n == size:
    return x
  pos = np.arange(size) * ((n - 1) / (size - 1)) if size > 1 else np.zeros(1)
  lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
  hi = np.minimum(lo + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  frac = (pos - lo).reshape(shape)
  return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def resize_posemb(posemb: np.ndarray, grid: tuple[int, int], method: str = "zoom") -> np.ndarray:
  """[1, g*g, D] learnt position embedding -> [1, gh*gw, D] for a (gh, gw) patch grid.

  Computed in float64 and returned in the input dtype; an unchanged grid returns the input.
  """
  if method not in METHODS:
    raise ValueError(f"posemb resize method={method!r}; use one of {METHODS}.")
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embedding must be [1, N, D], got {posemb.shape}.")
  _, n, d = posemb.shape
  g = square_grid(n)
  gh, gw = grid
  if g is None:
    raise ValueError(f"the position embedding has {n} positions, not a square grid; it cannot "
                     f"be resized to {gh}x{gw}.")
  if (g, g) == (gh, gw):
    return posemb
  x = posemb.reshape(g, g, d).astype(np.float64)
  if method == "zoom":
    x = _zoom_axis(_zoom_axis(x, gh, 0), gw, 1)
  else:
    x = np.asarray(jax.image.resize(x, (gh, gw, d), method=method, antialias=False))
  return x.reshape(1, gh * gw, d).astype(posemb.dtype)
