"""Fake text tower pieces shared by the evaluator and zero-shot annotation tests: a bag of
words with one embedding axis per known word."""
import re

import numpy as np


def unit(x):
  """Rows scaled to unit length (float64; zero rows stay zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class BagOfWords:
  """encode: word ids (1-based in sorted `axis` order, unknown words -> len(axis) + 1),
  0-padded to `length`."""

  def __init__(self, axis: dict, length: int):
    self.vocab, self.axis, self.length = sorted(axis), axis, length

  def encode(self, texts):
    out = np.zeros((len(texts), self.length), np.int32)
    for row, text in zip(out, texts):
      ids = [self.vocab.index(w) + 1 if w in self.axis else len(self.vocab) + 1
             for w in re.findall(r"\w+", text.lower())]
      row[:len(ids)] = ids
    return out


def word_table(axis: dict, dim: int) -> np.ndarray:
  """float32 [len(axis) + 2, dim]: word id -> one-hot of its axis (pad and unknown: zero), so
  `table[tokens].sum(1)` is the bag of words."""
  vocab = sorted(axis)
  table = np.zeros((len(vocab) + 2, dim), np.float32)
  for i, word in enumerate(vocab):
    table[i + 1, axis[word]] = 1.0
  return table
