"""Strict checks of M4's annotation inputs (SPEC §1), shared by every way annotations come in.

Shapes are checked up front, from array shapes or file headers, before any pass over the data:
  s [N, m] (m >= 1), known [N] or [N, m], y [N, c], w [N, p], u [N],
with the same N for every field of a shard and the same m, c, p in every shard. Values are
checked in the first pass (or at once for in-memory arrays): nothing non-finite in any field
that is given, whether or not the config uses it; s, known, y and w exactly 0 or 1 unless
`balance.soft_membership` allows [0, 1]. Every message names the field, what it got and what
it must be.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

FIELDS = ("s", "known", "y", "w", "u")
MULTI_HOT = ("s", "known", "y", "w")  # 0/1 by SPEC §1 (membership, known, labels, proxies)
_WANT = {"s": "[N, m] with m >= 1 (one multi-hot column per group)",
         "known": "[N] or [N, m]", "y": "[N, c] (one 0/1 column per label)",
         "w": "[N, p] (one 0/1 column per proxy)", "u": "[N] (one utility per example)"}
_WIDTH = {"s": ("m", "groups"), "y": ("c", "labels"), "w": ("p", "proxies")}


def _fix(name: str, shape: tuple[int, ...], n: int | None) -> str:
  """The likely fix for a field of the wrong shape."""
  if n is not None and shape[:1] != (n,):
    return ("every field needs one row per example, in the same order as 's' (a field with "
            "more or fewer rows is never cut or padded)")
  if name == "u" or (name == "known" and len(shape) == 2 and shape[1] == 1):
    return f"flatten it to [N] ({name}[:, 0] or {name}.reshape(-1))"
  if len(shape) == 1:
    return (f"give it as [N, 1] ({name}[:, None]) for a single column, or one-hot encode "
            "indices (np.eye(k)[index])")
  if name == "s" and len(shape) == 2 and shape[1] == 0:
    return "M4 needs at least one group column"
  return "see docs/ARCHITECTURE.md, Annotations"


def _shape_error(where: str, name: str, shape, want: str, n, s_shape, fix: str) -> ValueError:
  like = f" with N = {n} like 's' {tuple(s_shape)}" if name != "s" and n is not None else ""
  return ValueError(f"{where}{name!r} has shape {tuple(shape)} but must be {want}{like}; "
                    f"{fix}.")


def check_shapes(specs: Mapping[str, Any], where: str = "annotations: ",
                 fix: str | None = None, dims: Mapping[str, int] | None = None) -> dict:
  """Checks the annotation fields' shapes and dtypes before any data are read.

  specs: {field: (shape, dtype)} of the fields given (others are ignored); where: prefix
  naming the source in messages (e.g. "annotation shard 'a.npz': "); fix: the fix to suggest
  (default: one per kind of mistake); dims: {'m', 'c', 'p'} another shard fixed, which this
  one must match. Returns {'n', 'm', 'c', 'p'} (c / p None when y / w are absent).
  """
  specs = {k: v for k, v in specs.items() if k in FIELDS}
  if "s" not in specs:
    raise ValueError(f"{where}annotations need 's' [N, m] (docs/ARCHITECTURE.md); got "
                     f"{sorted(specs)}.")
  for name, (shape, dtype) in specs.items():
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
      raise ValueError(f"{where}{name!r} has dtype {dtype}, but M4 reads numbers (0/1 for "
                       "s, known, y, w; a float for u); convert it, e.g. with "
                       f"np.asarray({name}, np.float32).")
  s = tuple(specs["s"][0])
  if len(s) != 2 or s[1] == 0:
    raise _shape_error(where, "s", s, _WANT["s"], None, s, fix or _fix("s", s, None))
  n, m = s
  for name in ("known", "y", "w", "u"):
    if name not in specs:
      continue
    shape = tuple(specs[name][0])
    rank = 1 if name == "u" else 2
    ok = shape[:1] == (n,) and (len(shape) == rank or (name == "known" and len(shape) in (1, 2)))
    if ok and name == "known" and len(shape) == 2:
      ok = shape[1] == m
    if not ok:
      want = f"[N] or [N, {m}] (m = {m} groups)" if name == "known" else _WANT[name]
      raise _shape_error(where, name, shape, want, n, s, fix or _fix(name, shape, n))
  out = dict(n=n, m=m, c=specs["y"][0][1] if "y" in specs else None,
             p=specs["w"][0][1] if "w" in specs else None)
  for name, (dim, what) in _WIDTH.items():
    want, got = (dims or {}).get(dim), out[dim]
    if want is not None and got is not None and got != want:
      raise ValueError(f"{where}{name!r} has {got} columns ({what}) but the first shard has "
                       f"{want}; every shard needs the same {what}, in the same order.")
  return out


def merge_dims(dims: dict | None, new: Mapping[str, int | None]) -> dict:
  """dims fixed so far, completed with the widths a newly checked shard gave."""
  out = dict(dims or {})
  for key in ("m", "c", "p"):
    if out.get(key) is None and new.get(key) is not None:
      out[key] = new[key]
  return out


def check_values(name: str, lo: float, hi: float, nonfinite: int, fractional: int,
                 where: str, soft: bool) -> None:
  """Raises for a field's value summary: non-finite values in any field; for the 0/1 fields,
  values outside [0, 1], and strictly between 0 and 1 unless `soft` (soft_membership)."""
  if nonfinite:
    raise ValueError(f"annotations[{name!r}] has {int(nonfinite)} non-finite values ({where}); "
                     "NaN or inf are refused in every field, used by the config or not: fix or "
                     "drop those rows.")
  if name not in MULTI_HOT:
    return
  if lo < 0 or hi > 1:
    raise ValueError(f"annotations[{name!r}] must lie in [0, 1] (multi-hot), got values in "
                     f"[{lo}, {hi}] ({where}).")
  if fractional and not soft:
    raise ValueError(
        f"annotations[{name!r}] must be exactly 0 or 1 (SPEC §1: membership is multi-hot), "
        f"but {int(fractional)} value(s) lie strictly between 0 and 1 ({where}); binarise them "
        f"(e.g. {name} >= 0.5), or set balance.soft_membership=True to read them as "
        "membership probabilities.")


def value_summary(x) -> tuple[float, float, int, int]:
  """(min, max, non-finite count, count strictly between 0 and 1) of an array, over its finite
  values; the numpy reference of the streamed checks (stream._totals)."""
  x = np.asarray(x)
  if x.size == 0:
    return 0.0, 0.0, 0, 0
  if x.dtype.kind in "biu":
    return float(x.min()), float(x.max()), 0, 0
  finite = np.isfinite(x)
  v = x[finite]
  lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
  return lo, hi, int((~finite).sum()), int(np.sum((v > 0) & (v < 1)))


def check_arrays(ann: Mapping[str, Any], config, where: str = "in memory") -> dict:
  """Shapes, dtypes and values of in-memory annotations (every given field); returns dims."""
  arrays = {k: np.asarray(v) for k, v in ann.items() if k in FIELDS}
  dims = check_shapes({k: (v.shape, v.dtype) for k, v in arrays.items()})
  soft = bool(config.get("soft_membership", False))
  for name, x in arrays.items():
    check_values(name, *value_summary(x), where, soft)
  return dims
