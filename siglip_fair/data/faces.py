"""TFDS builders for the face-attribute bias benchmarks FairFace and UTKFace.

Both datasets are licensed for research use and must be downloaded by hand, so
the builders only read a MANUAL folder (`download_config.manual_dir`); nothing
is ever fetched. Records are stored as ArrayRecord so `tfds.data_source` reads
them without TensorFlow. The original JPEG bytes are stored unchanged:
`tfds.features.Image` would need TensorFlow to *re-encode* an array, but passes
existing JPEG bytes through.

Labels use OUR convention, shared with the synthetic world (GROUPS = ("man", "woman")) and
CelebA: gender 0 = male, 1 = female; age in FairFace's nine groups; race as each
dataset publishes it (FairFace has 7 groups, UTKFace 5).

Build (once, in any environment; no network needed):

    from siglip_fair.data import faces
    faces.build("fairface", manual_dir="~/fairface", data_dir="~/tensorflow_datasets")
"""
from __future__ import annotations

import csv
import os
import re
import warnings

from etils import epath
import tensorflow_datasets as tfds

_VERSION = "1.0.0"

GENDERS = ("male", "female")  # index order = world.GROUPS ("man", "woman")
AGE_GROUPS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59",
              "60-69", "more than 70")
FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian",
                  "Southeast Asian", "Indian", "Middle Eastern")
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")

FAIRFACE_CSVS = {"train": "fairface_label_train.csv",
                 "validation": "fairface_label_val.csv"}


def age_group(age: int) -> int:
  """Index into AGE_GROUPS of an age in years (FairFace's binning)."""
  if age < 0:
    raise ValueError(f"Negative age {age}.")
  # Upper bounds of the first eight groups; FairFace's last group is 70+.
  for i, upper in enumerate((2, 9, 19, 29, 39, 49, 59, 69)):
    if age <= upper:
      return i
  return len(AGE_GROUPS) - 1


def _features(races) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3),
                                   encoding_format="jpeg"),
      "file_name": tfds.features.Text(),
      "gender": tfds.features.ClassLabel(names=GENDERS),
      "age_group": tfds.features.ClassLabel(names=AGE_GROUPS),
      "race": tfds.features.ClassLabel(names=races),
  })


def require_manual_dir(dl_manager, name: str, instructions: str) -> epath.Path:
  """The manual dir, or a FileNotFoundError that says what to put there."""
  try:
    path = epath.Path(dl_manager.manual_dir)
  except AssertionError as e:  # TFDS asserts the folder exists and is non-empty
    raise FileNotFoundError(
        f"{name}: manual download folder is missing or empty.\n"
        f"{instructions}") from e
  if not path.is_dir() or not any(path.iterdir()):
    raise FileNotFoundError(
        f"{name}: manual download folder {path} is missing or empty.\n"
        f"{instructions}")
  return path


class FairFace(tfds.core.GeneratorBasedBuilder):
  """FairFace (Kärkkäinen & Joo, 2021): faces balanced over 7 race groups."""

  name = "fairface"
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Initial release."}
  # See builder.py: avoids TFDS's `importlib_resources` code_path lookup.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download FairFace from https://github.com/joojs/fairface (the "Padding=0.25"
image zip and the two label CSVs) and place them so that the manual dir holds:
  <manual_dir>/fairface_label_train.csv
  <manual_dir>/fairface_label_val.csv
  <manual_dir>/train/1.jpg, ...   (the `file` column of the CSVs is relative
  <manual_dir>/val/1.jpg, ...      to <manual_dir>)
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_features(FAIRFACE_RACES),
        # Record i is CSV row i, so per-example annotations line up.
        disable_shuffling=True,
        homepage="https://github.com/joojs/fairface",
    )

  def _split_generators(self, dl_manager):
    root = require_manual_dir(dl_manager, "fairface",
                               self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    missing = [f for f in FAIRFACE_CSVS.values() if not (root / f).exists()]
    if missing:
      raise FileNotFoundError(
          f"fairface: {root} lacks {missing}.\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(root, root / csv_name)
            for split, csv_name in FAIRFACE_CSVS.items()}

  def _generate_examples(self, root: epath.Path, csv_path: epath.Path):
    with csv_path.open() as f:
      for row in csv.DictReader(f):
        file_name = row["file"].strip()
        yield file_name, {
            "image": (root / file_name).read_bytes(),
            "file_name": file_name,
            "gender": row["gender"].strip().lower(),
            "age_group": row["age"].strip(),
            "race": row["race"].strip(),
        }


# [age]_[gender]_[race]_[date&time].jpg; the aligned set adds ".chip.jpg".
_UTK_NAME = re.compile(r"^(\d+)_([01])_([0-4])_[^_]+?\.jpg(\.chip\.jpg)?$",
                       re.IGNORECASE)


def parse_utkface_name(file_name: str) -> dict | None:
  """Labels (our convention) from a UTKFace file name; None if malformed."""
  m = _UTK_NAME.match(os.path.basename(file_name))
  if m is None:
    return None
  age, utk_gender, race = int(m[1]), int(m[2]), int(m[3])
  # UTKFace codes 0 = male, 1 = female, as ours does.
  return {"gender": utk_gender, "age_group": age_group(age), "race": race,
          "age": age}


def _jpegs(folder: epath.Path):
  # epath refuses recursive globs (they would be slow on GCS), so walk.
  for p in folder.iterdir():
    if p.is_dir():
      yield from _jpegs(p)
    elif p.name.lower().endswith(".jpg"):
      yield p


class UTKFace(tfds.core.GeneratorBasedBuilder):
  """UTKFace (Zhang et al., 2017): faces labelled with age, gender and race."""

  name = "utkface"
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Initial release."}
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download UTKFace from https://susanqq.github.io/UTKFace/ (e.g. the
"Aligned&Cropped Faces" UTKFace.tar.gz) and extract the JPEGs anywhere under
<manual_dir>; files must be named [age]_[gender]_[race]_[date&time].jpg
(or ...jpg.chip.jpg), e.g. <manual_dir>/UTKFace/25_0_2_20170116174525125.jpg.
Files with other names are skipped with a warning.
"""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_features(UTKFACE_RACES),
        disable_shuffling=True,
        homepage="https://susanqq.github.io/UTKFace/",
    )

  def _split_generators(self, dl_manager):
    root = require_manual_dir(dl_manager, "utkface",
                               self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    files = sorted(_jpegs(root))
    parsed, bad = [], []
    for path in files:
      labels = parse_utkface_name(path.name)
      (bad if labels is None else parsed).append((path, labels))
    if bad:
      # The published archive itself has a few names missing a field.
      warnings.warn(
          f"utkface: skipped {len(bad)} of {len(files)} JPEGs with malformed "
          f"names, e.g. {[p.name for p, _ in bad[:3]]}.", stacklevel=2)
    if not parsed:
      raise FileNotFoundError(
          f"utkface: no well-named UTKFace JPEGs under {root}.\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {"train": self._generate_examples(root, parsed)}

  def _generate_examples(self, root: epath.Path, parsed):
    for path, labels in parsed:
      key = os.fspath(path.relative_to(root))
      yield key, {
          "image": path.read_bytes(),
          "file_name": key,
          "gender": labels["gender"],
          "age_group": labels["age_group"],
          "race": labels["race"],
      }


class NotPreparedError(ValueError):
  """A dataset is not (correctly) prepared in the data dir; says how to fix it."""


BUILDERS = {"fairface": FairFace, "utkface": UTKFace}


def _builder(name: str, data_dir) -> tfds.core.GeneratorBasedBuilder:
  if name not in BUILDERS:
    raise ValueError(f"Unknown face dataset {name!r}; known: {sorted(BUILDERS)}.")
  return BUILDERS[name](
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record")


def build(name: str, manual_dir, data_dir=None) -> str:
  """Prepares `name` ('fairface' or 'utkface') from its manual folder.

  Returns:
    The builder's data directory. A complete build is reused.
  """
  if name not in BUILDERS:
    raise ValueError(f"Unknown face dataset {name!r}; known: {sorted(BUILDERS)}.")
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    # Checked here as well as in the builder so the message names the folder (TFDS's own
    # check is a bare assertion) and nothing of the dataset is started.
    raise FileNotFoundError(f"{name}: manual download folder {manual_dir} is missing or "
                            f"empty.\n{BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder = _builder(name, data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def data_source(name: str, split: str, data_dir=None):
  """Random-access source of a built split (raw TFDS records)."""
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    where = data_dir or "the default TFDS data dir"
    raise NotPreparedError(
        f"{name} is not prepared under {where}. It needs a manual download:\n"
        f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}then run\n"
        f"  siglip_fair.data.faces.build({name!r}, manual_dir=..., "
        f"data_dir={os.fspath(data_dir) if data_dir else None!r})")
  return builder.as_data_source(split=split)


def label_names(name: str) -> dict[str, tuple[str, ...]]:
  """Class names of each label field of a face dataset."""
  if name not in BUILDERS:
    raise ValueError(f"Unknown face dataset {name!r}; known: {sorted(BUILDERS)}.")
  races = FAIRFACE_RACES if name == "fairface" else UTKFACE_RACES
  return {"gender": GENDERS, "age_group": AGE_GROUPS, "race": races}
