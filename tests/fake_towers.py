"""Fake text tower pieces shared by the evaluator and zero-shot annotation tests: a bag of
words with one embedding axis per known word, and a word-hash tokenizer."""
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


class WordHash:
  """encode: one id in [1, 300] per whitespace-separated word (a hash of its characters),
  0-padded / cut to `length`: enough to tell a few hundred prompts apart for a real text tower."""

  def __init__(self, length: int = 12):
    self.length = length

  def encode(self, texts):
    out = np.zeros((len(texts), self.length), np.int32)
    for row, text in zip(out, texts):
      ids = [1 + sum(map(ord, w)) % 300 for w in str(text).split()][:self.length]
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


def index_image(index):
  """uint8 [2, 4, 3] image carrying `index` in its first two bytes."""
  flat = np.zeros(24, np.uint8)
  flat[:2] = divmod(index, 256)
  return flat.reshape(2, 4, 3)


def embed_indexed_images(params, images):
  """params['images'][i] for each `index_image(i)` (as the eval pipeline scales it to [-1, 1])."""
  pixels = np.round((images + 1.0) * 127.5).astype(np.int64).reshape(len(images), -1)
  index = pixels[:, 0] * 256 + pixels[:, 1]
  return params["images"][np.where(index < len(params["images"]), index, 0)]  # 0: padding


def embed_word_sums(params, tokens):
  """The normalised sum of params['words'] over a prompt's token ids."""
  return unit(params["words"][tokens].sum(1))


def bias_context(num_objects, genders, words: dict, max_len: int):
  """An EvalContext with `num_objects` object images and one people image per gender, embedded
  by index (`params['images']`) and bag of words (`params['words']`), at temperature
  params['t']."""
  from siglip_fair.evaluate import evaluators as ev  # pylint: disable=g-import-not-at-top
  sources = {"objects": [{"image": index_image(i)} for i in range(num_objects)],
             "people": [{"image": index_image(num_objects + i), "gender": np.int32(g)}
                        for i, g in enumerate(genders)]}
  return ev.EvalContext(embed_indexed_images, embed_word_sums, BagOfWords(words, max_len),
                        sources, batch_size=16, temperature=lambda params: params["t"])
