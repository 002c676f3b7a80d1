"""Real evaluation datasets as random-access sources in our evaluator convention.

`load_source(name, split)` wraps a prepared TFDS split (read through
`tfds.data_source`, i.e. ArrayRecord files, no TensorFlow) in a lazy view whose
records are dicts like the synthetic world's: `image` uint8 [H, W, 3] plus the
dataset's label/caption fields. Nothing is decoded until a record is read, and
nothing is ever downloaded: an unprepared dataset raises `DatasetNotPrepared`
saying how to prepare it.

Fields per dataset:
  imagenet2012, imagenet_v2, cifar100: label int64.
  coco_captions (Karpathy splits test/val/restval/train): captions object
    array of bytes [5], image_id int64.
  celeb_a: gender int64 (0 male, 1 female; from `Male`), young int64,
    attributes uint8 [40] in CELEB_A_ATTRIBUTES order.
  fairface, utkface (see `faces`): gender int64 (0 male, 1 female, as the synthetic world's
    GROUPS = ("man", "woman")),
    age_group int64, race int64.
  dollar_street (see `dollar_street`): topic bytes, income_quartile int64 (0-3), region int64
    (index into dollar_street.REGIONS).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import os
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder
from tensorflow_datasets.core import registered

from siglip_fair.data import builder, faces, preprocess

NUM_CAPTIONS = 5

# TFDS celeb_a's attribute order (the list_attr_celeba.txt header).
CELEB_A_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs "
    "Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair "
    "Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings "
    "Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


DatasetNotPrepared = faces.NotPreparedError


# --- field mappings: raw TFDS record -> our fields (image handled separately)


def _label(ex: Mapping[str, Any]) -> dict[str, Any]:
  return {"label": np.int64(ex["label"])}


def _coco(ex: Mapping[str, Any]) -> dict[str, Any]:
  texts = ex["captions"]["text"]
  texts = [t.encode("utf-8") if isinstance(t, str) else bytes(t)
           for t in np.asarray(texts, dtype=object).ravel()]
  if not texts:
    raise ValueError(f"COCO image {ex.get('image/id')} has no captions.")
  # Cycling (not empty padding) keeps every caption a real query for its
  # image; Karpathy images have >= 5 captions, so this rarely applies.
  captions = np.empty((NUM_CAPTIONS,), dtype=object)
  captions[:] = [texts[i % len(texts)] for i in range(NUM_CAPTIONS)]
  return {"captions": captions, "image_id": np.int64(ex["image/id"])}


def _celeb_a(ex: Mapping[str, Any]) -> dict[str, Any]:
  attrs = ex["attributes"]
  return {
      "gender": np.int64(not attrs["Male"]),  # 0 = male: the index of "man" in GROUPS
      "young": np.int64(bool(attrs["Young"])),
      "attributes": np.array([bool(attrs[a]) for a in CELEB_A_ATTRIBUTES],
                             np.uint8),
  }


def _faces(ex: Mapping[str, Any]) -> dict[str, Any]:
  return {k: np.int64(ex[k]) for k in ("gender", "age_group", "race")}


def _dollar_street(ex: Mapping[str, Any]) -> dict[str, Any]:
  topic = ex["topic"]
  return {"topic": topic.encode("utf-8") if isinstance(topic, str) else bytes(topic),
          "income_quartile": np.int64(ex["income_quartile"]), "region": np.int64(ex["region"])}


class DatasetSpec(NamedTuple):
  tfds_name: str
  fields: Callable[[Mapping[str, Any]], dict[str, Any]]


DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec("imagenet2012", _label),
    "imagenet_v2": DatasetSpec("imagenet_v2", _label),
    "cifar100": DatasetSpec("cifar100", _label),
    "coco_captions": DatasetSpec("coco_captions", _coco),
    "celeb_a": DatasetSpec("celeb_a", _celeb_a),
    "fairface": DatasetSpec("fairface", _faces),
    "utkface": DatasetSpec("utkface", _faces),
    "dollar_street": DatasetSpec("dollar_street", _dollar_street),
}

_MANUAL = {
    "imagenet2012": "it needs a manual download: put ILSVRC2012_img_train.tar "
                    "and ILSVRC2012_img_val.tar from https://image-net.org in "
                    "MANUAL_DIR, then\n  tfds build imagenet2012 --manual_dir "
                    "MANUAL_DIR",
}


def _prepare_hint(name: str, data_dir) -> str:
  dd = f" --data_dir {os.fspath(data_dir)}" if data_dir else ""
  how = _MANUAL.get(
      name, f"it is downloaded by TFDS (needs network):\n  tfds build {name}")
  return (f"{how}{dd} --file_format array_record\n(in an environment with "
          "TensorFlow; reading afterwards needs neither TensorFlow nor "
          "network).")


def _is_tf_missing(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, ModuleNotFoundError) and "tensorflow" in str(e):
      return True
    e = e.__cause__
  return False


def _not_prepared(tfds_name: str, data_dir, builder=None) -> DatasetNotPrepared:
  """The error for a dataset that `tfds.data_source` cannot read."""
  where = data_dir or "the default TFDS data dir"
  try:
    builder = builder or tfds.builder(tfds_name, data_dir=data_dir,
                                      try_gcs=False)
    fmt = builder.info.file_format if builder.is_prepared() else None
  except Exception:  # pylint: disable=broad-except
    fmt = None  # e.g. the builder code needs TensorFlow: report "not prepared"
  hint = _prepare_hint(tfds_name, data_dir)
  if fmt is not None:
    return DatasetNotPrepared(
        f"{tfds_name} is prepared under {where} as {getattr(fmt, 'value', fmt)}, but random "
        f"access needs array_record; convert it with `tfds convert_format` or "
        f"rebuild it: {hint}")
  return DatasetNotPrepared(
      f"{tfds_name} is not prepared under {where}, and nothing is downloaded "
      f"here. To prepare it, {hint}")


def _tfds_source(tfds_name: str, split: str, data_dir):
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                            download=False, try_gcs=False)
  except ModuleNotFoundError as e:
    if not _is_tf_missing(e):
      raise
    # Some builders' code (coco_captions) imports TensorFlow just to describe
    # their features; a prepared dataset's own metadata suffices to read it.
  except (NotImplementedError, AssertionError, FileNotFoundError,
          registered.DatasetNotFoundError) as e:
    raise _not_prepared(tfds_name, data_dir) from e
  try:
    builder = read_only_builder.builder_from_files(tfds_name, data_dir=data_dir)
  except registered.DatasetNotFoundError as e:
    raise _not_prepared(tfds_name, data_dir) from e
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise _not_prepared(tfds_name, data_dir, builder) from e


def prepare_image(image: np.ndarray, image_size: int | None = None) -> np.ndarray:
  """uint8 [H, W, 3]: grayscale/alpha fixed; center-cropped square and
  resized to image_size x image_size when given."""
  img = preprocess.rgb_channels(image)
  if img.dtype != np.uint8:
    img = np.clip(img, 0, 255).astype(np.uint8)
  if image_size is None:
    return img
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  if s != image_size:
    img = np.asarray(PIL.Image.fromarray(img).resize(
        (image_size, image_size), PIL.Image.Resampling.BICUBIC))
  return img


class Records:
  """Lazy view of a TFDS source with records converted on access."""

  def __init__(self, source, fields: Callable[[Mapping[str, Any]], dict],
               image_size: int | None = None):
    if image_size is not None and image_size < 1:
      raise ValueError(f"image_size={image_size} must be >= 1.")
    self.source = source
    self.fields = fields
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.source)

  def _convert(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": prepare_image(ex["image"], self.image_size),
            **self.fields(ex)}

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"Record {i} out of range for {n} records.")
    return self._convert(self.source[int(i) % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # ArrayRecord reads a batch of records in one call, much faster than one
    # by one.
    getitems = getattr(self.source, "__getitems__", None)
    raw = (getitems([int(i) for i in indices]) if getitems is not None
           else [self.source[int(i)] for i in indices])
    return [self._convert(ex) for ex in raw]

  def __repr__(self) -> str:
    return (f"Records({len(self)} records, image_size={self.image_size}, "
            f"source={self.source!r})")


def load_source(name: str, split: str, *, data_dir=None,
                image_size: int | None = None) -> Records:
  """Random-access source of one split of a registered dataset.

  Args:
    name: a key of DATASETS.
    split: the TFDS split name (e.g. 'validation' for imagenet2012, 'test' for
      imagenet_v2/cifar100/coco_captions/celeb_a, 'train' for utkface).
    data_dir: TFDS data dir (default: TFDS's, e.g. ~/tensorflow_datasets).
    image_size: if given, images are center-cropped and resized to it.

  Raises:
    ValueError: unknown name; DatasetNotPrepared (a ValueError) if the data is
      not prepared as array_record under data_dir.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}.")
  spec = DATASETS[name]
  if name in faces.BUILDERS:
    source = faces.data_source(spec.tfds_name, split, data_dir)
  elif name == "dollar_street":
    from siglip_fair.data import dollar_street  # pylint: disable=g-import-not-at-top
    source = dollar_street.data_source(split, data_dir)
  else:
    source = _tfds_source(spec.tfds_name, split, data_dir)
  where = os.fspath(data_dir) if data_dir else "the default TFDS data dir"
  source = builder.CheckedSource(
      source, f"{name} split {split!r}",
      f"delete that dataset's folder under {where} and prepare it again")
  return Records(source, spec.fields, image_size)
