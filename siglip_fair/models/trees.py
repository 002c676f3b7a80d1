"""Nested parameter dicts as flat '/'-joined names, and the check that a tree fits a model:
shared by the checkpoint formats (big_vision.py, hf.py, released.py)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}; leaves as they are."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def flatten_to_host(tree: Mapping) -> dict[str, np.ndarray]:
  """`flatten` with every leaf a host numpy array."""
  return {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}


def check_fit(model, params: Mapping, image_hw: tuple[int, int], *, what: str,
              name: Callable[[str], str] = lambda k: k) -> None:
  """Raises ValueError unless `params` have exactly the keys and shapes `model.init` makes on
  `image_hw` images, naming (through `name`) the keys missing, extra and of other shapes.

  what: how the message names `params`, e.g. 'the checkpoint'.
  """
  h, w = image_hw
  tokens = np.zeros((1, model.txt.max_len), np.int32)
  want = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, h, w, 3), np.float32),
                        tokens)["params"]
  want = {name(k): tuple(v.shape) for k, v in flatten(want).items()}
  have = {name(k): tuple(np.shape(v)) for k, v in flatten(params).items()}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = sorted(f"{k}: {what.split()[-1]} {have[k]}, model {want[k]}"
                  for k in set(want) & set(have) if have[k] != want[k])
  if missing or extra or shapes:
    size = f"{h}x{w}" if h != w else f"{h}"
    raise ValueError(f"{what} does not fit config.model at {size} px: the model has keys "
                     f"{what} lacks {missing[:12]}, {what} has keys the model lacks "
                     f"{extra[:12]}, shapes differ {shapes[:12]}.")
