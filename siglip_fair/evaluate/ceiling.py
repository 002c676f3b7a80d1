"""The best retrieval Recall@k any model could reach on a split, given its captions alone.

Several images of a split often share a caption ("a photo of a ball"). A text tower maps
identical texts to one embedding, so no model can tell those captions apart, and Recall@k has
a ceiling below 1 that does not depend on the model. Reporting it next to R@k says how much
of the gap to 1 is the data's and how much the model's. Captions are identical when they are
equal after `normalize_caption` (lower case, runs of whitespace collapsed, as the project's
lower-casing SentencePiece tokenizer sees them).

Notation: text c is a normalised caption, n_c(i) the number of captions of image i equal to
c, m_c the number of images holding c, and N_c = Σ_i n_c(i).

Text -> image (a query is one caption; its own image is the one positive). All queries with
text c are one query for the model, so one ranking of the images serves them all, and at most
k images can sit in its top k. The most queries of text c that can be hits is the sum of the
k largest n_c(i); the ceiling is Σ_c (that sum) / #captions. When no image repeats a caption
(n_c(i) ≤ 1) this is the mean over queries q of min(1, k / m_q), which is also the chance of
a hit when the m_q tied images are ordered at random.

Image -> text (a query is an image; a hit is any of its captions within the top k). The image
can put one of its texts c first, but the N_c − n_c(i) copies of c held by other images score
exactly the same. `metrics` counts a negative tied with the best positive as ranked ahead
("metric" ties, the rule R@k is reported under), so the image is a hit at best iff some c of
its captions has fewer than k copies elsewhere: the ceiling is the share of such images.
Were ties broken at random ("random" ties), the best c would be a hit with probability
1 − C(o, k) / C(o + p, k), o = N_c − n_c(i) copies elsewhere and p = n_c(i) own ones (the
chance that some own copy lands in the first k of the shuffled block); it is ≥ the "metric"
value and the same bound as t2i's min(1, k / m) when p = 1.

Both are upper bounds, attainable when the towers are free to rank every query's candidates
as they like; captions that differ only past the text tower's maximum length are also
indistinguishable, so the true ceiling can be lower still.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIES = ("metric", "random")


def normalize_caption(text: str | bytes) -> str:
  """Lower case, whitespace runs collapsed to one space, ends stripped."""
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  return " ".join(str(text).lower().split())


def _pair_counts(texts: Sequence[str | bytes], text_image: np.ndarray, num_images: int):
  """Distinct (text id, image) pairs with n_c(i), and N_c per text id."""
  text_image = np.asarray(text_image)
  if text_image.shape != (len(texts),) or not np.issubdtype(text_image.dtype, np.integer):
    raise ValueError(f"text_image must be int [{len(texts)}] (one image per caption), got "
                     f"{text_image.dtype} {text_image.shape}.")
  if not len(texts):
    raise ValueError("A retrieval ceiling needs at least one caption.")
  if text_image.min() < 0 or text_image.max() >= num_images:
    raise ValueError(f"text_image must lie in [0, {num_images}); got values in "
                     f"[{text_image.min()}, {text_image.max()}].")
  _, text_id = np.unique([normalize_caption(t) for t in texts], return_inverse=True)
  pairs, count = np.unique(np.stack([text_id.reshape(-1), text_image], 1), axis=0,
                           return_counts=True)
  total = np.bincount(text_id.reshape(-1))
  return pairs[:, 0], pairs[:, 1], count, total


def t2i_ceiling(texts: Sequence[str | bytes], text_image: np.ndarray, num_images: int,
                k: int) -> float:
  """Best text->image R@k: Σ_c (sum of the k largest n_c(i)) / #captions (module docstring).

  Args:
    texts: [M] captions (str or utf-8 bytes).
    text_image: int [M], the image of each caption.
    num_images: N, the number of images.
    k: the cut-off, >= 1.

  Returns:
    A fraction in (0, 1].
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  text, _, count, _ = _pair_counts(texts, text_image, num_images)
  # Within each text, images by decreasing n_c(i); the first k of each text can be hits.
  order = np.lexsort((-count, text))
  text, count = text[order], count[order]
  start = np.searchsorted(text, text, side="left")
  place = np.arange(len(text)) - start
  return float(count[place < k].sum() / len(texts))


def i2t_ceiling(texts: Sequence[str | bytes], text_image: np.ndarray, num_images: int,
                k: int, ties: str = "metric") -> float:
  """Best image->text R@k (module docstring), mean over images.

  Args:
    texts, text_image, num_images, k: as `t2i_ceiling`; every image needs a caption.
    ties: "metric" (a tied wrong caption ranks ahead, as `metrics.i2t_ranks` counts it) or
      "random" (ties broken uniformly at random; the expected hit).

  Returns:
    A fraction in [0, 1].
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  if ties not in TIES:
    raise ValueError(f"ties={ties!r}; use one of {TIES}.")
  text, image, own, total = _pair_counts(texts, text_image, num_images)
  if len(np.unique(image)) != num_images:
    raise ValueError("Every image needs at least one caption for an image->text ceiling.")
  elsewhere = total[text] - own
  if ties == "metric":
    hit = (elsewhere < k).astype(np.float64)
  else:
    # C(o, k) / C(o + p, k) = Π_{j=1..p} (o − k + j) / (o + j) when o >= k, else 0.
    miss = np.where(elsewhere >= k, 1.0, 0.0)
    for j in range(1, int(own.max()) + 1):
      factor = (elsewhere - k + j) / (elsewhere + j)
      miss = np.where((j <= own) & (elsewhere >= k), miss * factor, miss)
    hit = 1.0 - miss
  best = np.zeros(num_images)
  np.maximum.at(best, image, hit)
  return float(best.mean())


def retrieval_ceilings(texts: Sequence[str | bytes], text_image: np.ndarray, num_images: int,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{"i2t_r{k}_ceiling", "t2i_r{k}_ceiling"} for each k, under the "metric" tie rule, the
  bounds of what `metrics.retrieval_recalls` reports."""
  out = {f"i2t_r{k}_ceiling": i2t_ceiling(texts, text_image, num_images, int(k)) for k in ks}
  out.update({f"t2i_r{k}_ceiling": t2i_ceiling(texts, text_image, num_images, int(k))
              for k in ks})
  return out
