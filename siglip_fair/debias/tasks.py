"""Debiasing tasks that need no download.

`coloured_digits`: scikit-learn's 1797 handwritten digits (bundled with the library), binary
target y = digit >= 5, drawn in one of two colours. In the training split the colour agrees
with the target for a share `correlation` of the images (a spurious shortcut); in the test
split it is independent of the target. The colour is the sensitive attribute, so the four
(target, colour) pairs are the groups, and the minority groups of training are those where
colour and target disagree.
"""
from __future__ import annotations

import numpy as np

# Two ink colours (RGB in [0, 1]); the background stays black.
COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 0.5, 1.0]], np.float32)
SPLITS = ("train", "test")


def coloured_digits(split: str, *, correlation: float = 0.95, seed: int = 0,
                    test_fraction: float = 0.3, size: int = 16) -> dict[str, np.ndarray]:
  """The coloured-digits split as arrays.

  Args:
    split: 'train' or 'test' (a fixed `test_fraction` of the digits, chosen by `seed`).
    correlation: P(colour = target) in the training split; the test split uses 0.5.
    seed: the split and the colour draws are a pure function of it.
    size: image side (nearest-neighbour upscaling of the 8 x 8 digits).

  Returns:
    image uint8 [n, size, size, 3]; label int64 [n] (digit >= 5); colour int64 [n] in {0, 1};
    digit int64 [n].
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise ValueError(f"coloured_digits: split={split!r}; use one of {SPLITS}.")
  if not 0.0 <= correlation <= 1.0:
    raise ValueError(f"coloured_digits: correlation={correlation} must lie in [0, 1].")
  if size % 8:
    raise ValueError(f"coloured_digits: size={size} must be a multiple of 8.")
  digits = load_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(digits.target))
  cut = int(round(len(order) * (1 - test_fraction)))
  rows = np.sort(order[:cut] if split == "train" else order[cut:])
  digit = digits.target[rows].astype(np.int64)
  label = (digit >= 5).astype(np.int64)
  # Each split draws its colours from its own stream, so train and test stay independent.
  agree = np.random.default_rng([seed, SPLITS.index(split)]).random(len(rows)) < (
      correlation if split == "train" else 0.5)
  colour = np.where(agree, label, 1 - label)
  ink = np.kron(digits.images[rows] / 16.0, np.ones((size // 8, size // 8)))  # [n, s, s]
  image = ink[..., None] * COLOURS[colour][:, None, None, :]
  return {"image": np.round(255 * image).astype(np.uint8), "label": label, "colour": colour,
          "digit": digit}
