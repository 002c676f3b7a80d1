"""Quality metrics on embeddings: zero-shot classification and retrieval.

All functions take numpy arrays of L2-normalised embeddings (cosine similarity
is a dot product) and return numpy values.

Ties: a query's rank is the number of NEGATIVE candidates scoring at least as
high as its best positive, so a wrong candidate tied with the right one ranks
ahead of it. A collapsed model (all embeddings equal) therefore scores 0, not 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  """x / ||x|| along `axis`; an all-zero vector stays zero."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def _check_embeddings(name: str, x: np.ndarray, dim: int | None = None) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D] embeddings, got shape {x.shape}.")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name} has width {x.shape[1]} but the other embeddings "
                     f"have width {dim}; both towers must embed into one space.")
  return x


def _check_labels(name: str, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be int [{n}] (one per row), got "
                     f"{labels.dtype} {labels.shape}.")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}); got values in "
                     f"[{labels.min()}, {labels.max()}]. Drop unlabelled rows "
                     "(label -1) first.")
  return labels


def prompt_ensemble(embeddings: np.ndarray, spans: Sequence[slice]) -> np.ndarray:
  """CLIP template ensemble: one embedding per prompt set.

  Args:
    embeddings: [P, D] text embeddings of all prompts (need not be normalised).
    spans: for each set, the slice of rows holding its prompts
      (`prompts.prompt_sets` returns them).

  Returns:
    [S, D]: per set, the mean of the L2-normalised prompt embeddings,
    renormalised.
  """
  embeddings = l2_normalize(_check_embeddings("embeddings", embeddings))
  means = []
  for i, span in enumerate(spans):
    rows = embeddings[span]
    if not len(rows):
      raise ValueError(f"Prompt set {i} (rows {span}) is empty.")
    means.append(rows.mean(0))
  return l2_normalize(np.stack(means))


def ranks_of_positives(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """Per query, the number of negatives scoring >= its best positive.

  Args:
    scores: float [Q, M] similarities of Q queries to M candidates.
    positive: bool [Q, M], True for each query's correct candidate(s); every
      query needs at least one.

  Returns:
    int [Q] ranks; a query is a hit at k iff rank < k.
  """
  best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
  return np.sum(~positive & (scores >= best), axis=1)


def zeroshot_ranks(image_emb: np.ndarray, class_emb: np.ndarray,
                   labels: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
  """Rank of the true class for each image (0 = top-1).

  Args:
    image_emb: [N, D] normalised image embeddings.
    class_emb: [C, D] normalised class embeddings (`prompt_ensemble`).
    labels: int [N] in [0, C).
    chunk_size: images scored at once; memory is O(chunk_size * C), so 50k images x 1k
      classes never hold the 200 MB score matrix.

  Returns:
    int [N]: number of other classes scoring >= the true class.
  """
  class_emb = _check_embeddings("class_emb", class_emb)
  image_emb = _check_embeddings("image_emb", image_emb, class_emb.shape[1])
  num_classes = class_emb.shape[0]
  labels = _check_labels("labels", labels, image_emb.shape[0], num_classes)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  ranks = []
  for start in range(0, image_emb.shape[0], chunk_size):
    scores = image_emb[start:start + chunk_size] @ class_emb.T
    true = np.take_along_axis(scores, labels[start:start + chunk_size, None], axis=1)
    # Equivalent to ranks_of_positives with one positive per row, without a [chunk, C] mask.
    ranks.append(np.sum(scores >= true, axis=1) - 1)
  return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def zeroshot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray,
                      labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
  """Top-k accuracies {k: fraction in [0, 1]}; k >= C gives 1 (k clipped to C)."""
  ranks = zeroshot_ranks(image_emb, class_emb, labels)
  return {k: float(np.mean(ranks < k)) for k in ks}


def _check_retrieval(image_emb, text_emb, text_image, chunk_size):
  image_emb = _check_embeddings("image_emb", image_emb)
  text_emb = _check_embeddings("text_emb", text_emb, image_emb.shape[1])
  text_image = _check_labels("text_image", text_image, text_emb.shape[0],
                             image_emb.shape[0])
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  if not len(image_emb) or not len(text_emb):
    raise ValueError(f"Retrieval needs images and captions; got "
                     f"{len(image_emb)} images and {len(text_emb)} captions.")
  return image_emb, text_emb, text_image


def _ranks_in_blocks(queries: np.ndarray, candidates: np.ndarray, own: np.ndarray,
                     owner: np.ndarray, chunk_size: int) -> np.ndarray:
  """Per query q: #candidates c with owner[c] != own[q] scoring >= q's best candidate with
  owner[c] == own[q]. Scores come in [chunk_size, chunk_size] blocks, never [Q, M] at once:
  one pass finds the best positive, a second counts the negatives above it. Both passes use
  the same blocks, so a tie is a tie bit for bit."""
  best = np.full(len(queries), -np.inf, np.result_type(queries, candidates))
  counts = np.zeros(len(queries), np.int64)
  for counting in (False, True):
    for qs in range(0, len(queries), chunk_size):
      q = slice(qs, qs + chunk_size)
      for cs in range(0, len(candidates), chunk_size):
        c = slice(cs, cs + chunk_size)
        scores = queries[q] @ candidates[c].T
        positive = owner[None, c] == own[q, None]
        if counting:
          counts[q] += np.sum(~positive & (scores >= best[q, None]), axis=1)
        else:
          best[q] = np.maximum(best[q], np.max(np.where(positive, scores, -np.inf), axis=1))
  return counts


def i2t_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              chunk_size: int = 1024) -> np.ndarray:
  """Image -> text ranks: per image, negatives ranked at/above its best caption.

  Args:
    image_emb: [N, D] normalised image embeddings.
    text_emb: [M, D] normalised caption embeddings (several per image).
    text_image: int [M], the index of each caption's image.
    chunk_size: block side; memory is O(chunk_size²), so 25k images x 125k captions never
      hold the whole similarity matrix.

  Returns:
    int [N]; an image is a hit at k (any of its captions in the top k) iff
    rank < k.
  """
  image_emb, text_emb, text_image = _check_retrieval(
      image_emb, text_emb, text_image, chunk_size)
  num_images = image_emb.shape[0]
  captioned = np.bincount(text_image, minlength=num_images)
  if np.any(captioned == 0):
    raise ValueError(f"{np.sum(captioned == 0)} image(s) have no caption in "
                     "text_image (e.g. image "
                     f"{np.flatnonzero(captioned == 0)[0]}); every image "
                     "needs at least one.")
  return _ranks_in_blocks(image_emb, text_emb, np.arange(num_images), text_image, chunk_size)


def t2i_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              chunk_size: int = 1024) -> np.ndarray:
  """Text -> image ranks: per caption, other images scoring >= its own image.

  Args: as `i2t_ranks`; blocks of chunk_size captions x chunk_size images.

  Returns:
    int [M]; a caption is a hit at k iff rank < k.
  """
  image_emb, text_emb, text_image = _check_retrieval(
      image_emb, text_emb, text_image, chunk_size)
  return _ranks_in_blocks(text_emb, image_emb, text_image, np.arange(image_emb.shape[0]),
                          chunk_size)


def retrieval_recalls(image_emb: np.ndarray, text_emb: np.ndarray,
                      text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
  """Recall@k both ways: {"i2t_r1": ..., "t2i_r1": ..., ...} in [0, 1].

  Args: as `i2t_ranks`.
  """
  i2t = i2t_ranks(image_emb, text_emb, text_image, chunk_size)
  t2i = t2i_ranks(image_emb, text_emb, text_image, chunk_size)
  out = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks}
  out.update({f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks})
  return out
