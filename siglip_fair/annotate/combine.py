"""Ground-truth annotations, combination rules and annotation quality.

An annotation dict holds float32 arrays over N examples: s [N, m], known [N],
y [N, c], w [N, p] (and u [N] once prepared for M4). Rows of `s` are zero
where `known` is 0.
"""
from collections.abc import Mapping, Sequence

import numpy as np

from siglip_fair.data import world

RULES = ("text", "image", "either", "both", "text_first")
FIELDS = ("s", "y", "w")


def from_ground_truth(split_arrays: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
  """Annotations from a world split's labels (`s`, `y`, `w`).

  The group is known exactly wherever the world sets one: on person images and
  on object scenes with an owner (whose group the captions may name although
  the image shows no one).
  """
  for key in ("s", "y", "w"):
    if key not in split_arrays:
      raise ValueError(f"split_arrays lacks {key!r}; pass the output of "
                       "siglip_fair.data.world.generate_split.")
  s = np.asarray(split_arrays["s"], np.float32)
  return dict(s=s, known=s.any(axis=1).astype(np.float32),
              y=np.asarray(split_arrays["y"], np.float32),
              w=np.asarray(split_arrays["w"], np.float32))


def combine(text_ann: Mapping[str, np.ndarray],
            image_ann: Mapping[str, np.ndarray],
            rule: str) -> dict[str, np.ndarray]:
  """Merges text- and image-side annotations of the same N examples.

  Rules:
    'text' / 'image': that side alone.
    'either': union. The group is known where either side knows it, and `s`
      is the union of the groups each knowing side names; `y` and `w` are the
      union of both sides' labels.
    'both': agreement. The group is known only where both sides know it and
      name the same groups; `y` and `w` are the labels both sides name.
    'text_first': the text side where it knows the group, else the image side
      (known where either knows); `y` and `w` rows come from the text side
      where it names any label, else from the image side.
  """
  if rule not in RULES:
    raise ValueError(f"Unknown annotation rule {rule!r}; expected one of "
                     f"{RULES}.")
  t = {k: np.asarray(text_ann[k], np.float32) for k in ("known",) + FIELDS}
  i = {k: np.asarray(image_ann[k], np.float32) for k in ("known",) + FIELDS}
  for k in t:
    if t[k].shape != i[k].shape:
      raise ValueError(f"Annotation field {k!r} has shape {t[k].shape} on "
                       f"the text side but {i[k].shape} on the image side.")
  if rule == "text":
    return t
  if rule == "image":
    return i
  ts, is_ = t["s"] * t["known"][:, None], i["s"] * i["known"][:, None]
  if rule == "either":
    known = np.maximum(t["known"], i["known"])
    return dict(s=np.maximum(ts, is_), known=known,
                y=np.maximum(t["y"], i["y"]), w=np.maximum(t["w"], i["w"]))
  if rule == "both":
    agree = (t["known"] * i["known"] > 0) & np.all(ts == is_, axis=1)
    known = agree.astype(np.float32)
    return dict(s=ts * known[:, None], known=known,
                y=np.minimum(t["y"], i["y"]), w=np.minimum(t["w"], i["w"]))
  # text_first
  use_text = t["known"][:, None] > 0
  out = dict(s=np.where(use_text, ts, is_),
             known=np.maximum(t["known"], i["known"]))
  for k in ("y", "w"):
    out[k] = np.where(t[k].any(axis=1, keepdims=True), t[k], i[k])
  return out


def _names(field, width, names):
  if names is not None and field in names:
    return tuple(names[field])
  default = dict(s=world.GROUPS, y=world.OCCUPATIONS, w=world.PROXIES)[field]
  return default if len(default) == width else tuple(map(str, range(width)))


def _ratio(num, den):
  return float(num / den) if den > 0 else float("nan")


def precision_recall(pred_ann: Mapping[str, np.ndarray],
                     truth_ann: Mapping[str, np.ndarray],
                     names: Mapping[str, Sequence[str]] | None = None
                     ) -> dict[str, float]:
  """Precision and recall of predicted multi-hot labels against the truth.

  For groups, a prediction counts only on rows it marks as known, and truth
  only on rows the truth marks as known. Keys are '{field}/{name}/precision'
  and '{field}/{name}/recall' per column, '{field}/micro/...' pooled over the
  columns of a field, and 'known/precision', 'known/recall' for whether the
  attribute was inferred at all. A ratio with a zero denominator is NaN.

  Args:
    pred_ann, truth_ann: annotation dicts over the same N examples.
    names: optional column names per field; defaults to the world's.
  """
  out = {}
  pk = np.asarray(pred_ann["known"]) > 0
  tk = np.asarray(truth_ann["known"]) > 0
  for field in FIELDS:
    p = np.asarray(pred_ann[field]) > 0
    t = np.asarray(truth_ann[field]) > 0
    if p.shape != t.shape:
      raise ValueError(f"Annotation field {field!r}: prediction shape "
                       f"{p.shape} != truth shape {t.shape}.")
    if field == "s":
      p, t = p & pk[:, None], t & tk[:, None]
    tp = (p & t).sum(axis=0)
    for col, name in enumerate(_names(field, p.shape[1], names)):
      out[f"{field}/{name}/precision"] = _ratio(tp[col], p[:, col].sum())
      out[f"{field}/{name}/recall"] = _ratio(tp[col], t[:, col].sum())
    out[f"{field}/micro/precision"] = _ratio(tp.sum(), p.sum())
    out[f"{field}/micro/recall"] = _ratio(tp.sum(), t.sum())
  out["known/precision"] = _ratio((pk & tk).sum(), pk.sum())
  out["known/recall"] = _ratio((pk & tk).sum(), tk.sum())
  return out
