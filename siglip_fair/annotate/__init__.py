"""Sensitive attributes, labels and proxies per example (SPEC §1).

Annotations are a dict of float32 arrays over the N examples of a split:
s [N, m], known [N], y [N, c], w [N, p], u [N] (docs/ARCHITECTURE.md).
"""
from collections.abc import Mapping
import os

import ml_collections
import numpy as np

from siglip_fair.annotate.combine import combine
from siglip_fair.annotate.combine import from_ground_truth
from siglip_fair.annotate.combine import precision_recall
from siglip_fair.annotate.combine import RULES
from siglip_fair.annotate.lexicon import annotate_captions
from siglip_fair.annotate.lexicon import default_lexicon_config
from siglip_fair.annotate.lexicon import tokenize
from siglip_fair.io import atomic_savez

SOURCES = ("text", "ground_truth", "combined", "image")
IMAGE_SIDES = ("ground_truth", "zeroshot")
KEYS = ("s", "known", "y", "w", "u")
_NDIM = dict(s=2, known=1, y=2, w=2, u=1)


def default_config() -> ml_collections.ConfigDict:
  """Annotation config.

  source: 'text' (lexicon over captions), 'ground_truth' (the world's labels),
    'image' (image side alone) or 'combined' (text and image side merged by
    `rule`, one of RULES; see `combine`).
  image: the image side: 'ground_truth' (the world's labels stand in for it) or
    'zeroshot' (inferred by the two-tower model in `zeroshot.checkpoint`, a
    training workdir or a released big_vision .npz / Hugging Face folder with its
    own tokenizer and preprocessing (an .npz's tokenizer file in
    `zeroshot.tokenizer`), with the prompt sets of `zeroshot`; see zeroshot.py).
  caption_index: which of the K captions the lexicon reads.
  """
  from siglip_fair.annotate import zeroshot  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict()
  cfg.source = "text"
  cfg.rule = "text_first"
  cfg.image = "ground_truth"
  cfg.caption_index = 0
  cfg.lexicon = default_lexicon_config()
  cfg.zeroshot = zeroshot.default_config()
  cfg.zeroshot.checkpoint = ""
  return cfg


def annotate_split(arrays: Mapping[str, np.ndarray],
                   cfg: ml_collections.ConfigDict,
                   image_ann: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
  """Annotations of a world split (output of `world.generate_split`).

  Args:
    arrays: the split's arrays; `captions` object [N, K] plus the ground-truth
      fields used by `from_ground_truth`.
    cfg: see `default_config`.
    image_ann: image-side annotations (e.g. zero-shot); defaults to ground
      truth. Used by source='combined' and 'image'.

  Returns:
    s, known, y, w as in `annotate_captions` and u float32 [N] zeros.
  """
  if cfg.source not in SOURCES:
    raise ValueError(f"annotate.source={cfg.source!r}; expected one of "
                     f"{SOURCES}.")
  if cfg.source == "ground_truth":
    ann = from_ground_truth(arrays)
  elif cfg.source == "image":
    ann = from_ground_truth(arrays) if image_ann is None else dict(image_ann)
  else:
    captions = np.asarray(arrays["captions"])
    if not 0 <= cfg.caption_index < captions.shape[1]:
      raise ValueError(f"annotate.caption_index={cfg.caption_index} but the "
                       f"split has {captions.shape[1]} captions per example.")
    ann = annotate_captions(captions[:, cfg.caption_index], cfg.lexicon)
    if cfg.source == "combined":
      image = from_ground_truth(arrays) if image_ann is None else image_ann
      ann = combine(ann, image, cfg.rule)
  ann = {k: np.asarray(v, np.float32) for k, v in ann.items()}
  ann["u"] = np.zeros(ann["known"].shape, np.float32)
  validate_annotations(ann)
  return ann


def validate_annotations(ann: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError unless ann follows the annotation contract."""
  missing = [k for k in KEYS if k not in ann]
  if missing:
    raise ValueError(f"Annotations lack {missing}; expected keys {KEYS}.")
  n = np.shape(ann["known"])[0] if np.ndim(ann["known"]) else None
  for k in KEYS:
    v = np.asarray(ann[k])
    if v.ndim != _NDIM[k] or v.shape[0] != n:
      raise ValueError(f"Annotation {k!r} has shape {v.shape}; expected "
                       f"{_NDIM[k]} dims with N={n} rows (N from 'known').")
    if not np.issubdtype(v.dtype, np.floating):
      raise ValueError(f"Annotation {k!r} has dtype {v.dtype}; expected "
                       "float32.")
    if not np.all(np.isfinite(v)):
      raise ValueError(f"Annotation {k!r} has NaN or inf values.")
    if k != "u" and (np.any(v < 0) or np.any(v > 1)):
      raise ValueError(f"Annotation {k!r} has values outside [0, 1].")


def save_annotations(path: str | os.PathLike,
                     ann: Mapping[str, np.ndarray]) -> None:
  """Atomically writes the annotation arrays to an .npz file at path."""
  validate_annotations(ann)
  atomic_savez(path, **{k: np.asarray(ann[k], np.float32) for k in KEYS})


def load_annotations(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and validates annotations written by `save_annotations`."""
  with np.load(path, allow_pickle=False) as data:
    ann = {k: data[k] for k in data.files if k in KEYS}
  try:
    validate_annotations(ann)
  except ValueError as e:
    raise ValueError(f"Bad annotation file {os.fspath(path)}: {e}") from None
  return ann
