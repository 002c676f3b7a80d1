"""TFDS builder for Dollar Street (Gaviria Rojas et al., 2022): household objects photographed in
homes across the world, with each home's monthly income and region.

The dataset (MLCommons, CC-BY) is downloaded by hand; the builder reads a MANUAL folder in the
layout of its release: a metadata CSV (default `images_v2.csv`) with at least the columns
`imageRelPath` (image path relative to the folder), `topics` (a Python-style list such as
"['toothbrush', 'bathroom']" or one word; the first topic is the label), `income` (monthly
US dollars), `region.id` (af, am, as, eu) and `country.name`, plus `id` when present. Nothing is
ever fetched.

Stored per image: the JPEG bytes unchanged, `topic` (text), `income`, `income_quartile` (0-3,
quartiles over every usable row of the CSV), `region` (index into REGIONS) and `country`.
Topics are kept as text because the release's topic list is not fixed; `debias.tasks` maps them
to class ids. Splits: 'test' holds the images whose crc32(id) % 5 == 0, 'train' the rest, so a
new release keeps every old image on its side. Rows whose image is missing or undecodable, or
whose income or region cannot be read, are skipped and counted (a warning), never fatal.

    from siglip_fair.data import dollar_street
    dollar_street.build(manual_dir="~/dollarstreet", data_dir="~/tensorflow_datasets")
"""
from __future__ import annotations

import ast
import csv
import io
import os
import warnings
import zlib

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from siglip_fair.data import faces

_VERSION = "1.0.0"
NAME = "dollar_street"
REGIONS = ("af", "am", "as", "eu")
DEFAULT_CSV = "images_v2.csv"


def first_topic(raw: str) -> str | None:
  """The first topic of a `topics` cell ("['a', 'b']" or "a"), or None if there is none."""
  raw = (raw or "").strip()
  if raw.startswith("["):
    try:
      items = ast.literal_eval(raw)  # a literal only: never evaluates code
    except (ValueError, SyntaxError):
      return None
    items = [str(x).strip() for x in items if str(x).strip()]
    return items[0] if items else None
  return raw or None


def split_of(image_id: str) -> str:
  return "test" if zlib.crc32(image_id.encode("utf-8")) % 5 == 0 else "train"


def _decodable(path: epath.Path) -> bool:
  try:
    with PIL.Image.open(path) as im:
      im.verify()
    return True
  except Exception:  # pylint: disable=broad-except  (any decoder error means a broken file)
    return False


def read_rows(root: epath.Path, csv_name: str = DEFAULT_CSV) -> tuple[list[dict], dict[str, int]]:
  """The usable rows of the metadata CSV (with income quartiles) and counts of skipped rows."""
  path = root / csv_name
  if not path.exists():
    raise FileNotFoundError(f"dollar_street: {path} does not exist.\n"
                            f"{DollarStreet.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  rows, skipped = [], {"missing image": 0, "undecodable image": 0, "bad income": 0,
                       "bad region": 0, "no topic": 0}
  # Undecodable bytes in a cell become U+FFFD rather than failing the whole build.
  text = path.read_bytes().decode("utf-8", errors="replace")
  with io.StringIO(text, newline="") as f:
    reader = csv.DictReader(f)
    need = {"imageRelPath", "topics", "income", "region.id"}
    if not need <= set(reader.fieldnames or ()):
      raise ValueError(f"dollar_street: {path} lacks column(s) "
                       f"{sorted(need - set(reader.fieldnames or ()))}.")
    for row in reader:
      rel = (row.get("imageRelPath") or "").strip()
      try:
        income = float(row["income"])
        if not np.isfinite(income) or income < 0:
          raise ValueError
      except (TypeError, ValueError):
        skipped["bad income"] += 1
        continue
      region = (row.get("region.id") or "").strip().lower()
      if region not in REGIONS:
        skipped["bad region"] += 1
        continue
      topic = first_topic(row.get("topics", ""))
      if topic is None:
        skipped["no topic"] += 1
        continue
      image = root / rel
      if not rel or not image.is_file():
        skipped["missing image"] += 1
        continue
      if not _decodable(image):
        skipped["undecodable image"] += 1
        continue
      rows.append({"id": (row.get("id") or rel).strip(), "path": image, "rel": rel,
                   "topic": topic, "income": income, "region": REGIONS.index(region),
                   "country": (row.get("country.name") or "").strip()})
  if rows:
    cuts = np.quantile([r["income"] for r in rows], [0.25, 0.5, 0.75])
    for r in rows:
      r["income_quartile"] = int(np.searchsorted(cuts, r["income"], side="right"))
  return rows, skipped


class DollarStreet(tfds.core.GeneratorBasedBuilder):
  """Dollar Street: household objects with the home's income and region."""

  name = NAME
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Initial release."}
  code_path = epath.Path(__file__)  # see builder.py
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the Dollar Street dataset (MLCommons, https://mlcommons.org/datasets/dollar-street/)
and unpack it so that the manual dir holds the metadata CSV and the images it points to:
  <manual_dir>/images_v2.csv        (columns imageRelPath, topics, income, region.id, ...)
  <manual_dir>/<imageRelPath>       (e.g. assets/.../image.jpg)
"""

  def __init__(self, *, csv_name: str = DEFAULT_CSV, **kwargs):
    self.csv_name = csv_name
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "id": tfds.features.Text(),
            "topic": tfds.features.Text(),
            "income": np.float32,
            "income_quartile": tfds.features.ClassLabel(num_classes=4),
            "region": tfds.features.ClassLabel(names=REGIONS),
            "country": tfds.features.Text(),
        }),
        disable_shuffling=True,
        homepage="https://mlcommons.org/datasets/dollar-street/",
    )

  def _split_generators(self, dl_manager):
    root = faces.require_manual_dir(dl_manager, NAME, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    rows, skipped = read_rows(root, self.csv_name)
    if sum(skipped.values()):
      warnings.warn(f"dollar_street: skipped {sum(skipped.values())} of "
                    f"{sum(skipped.values()) + len(rows)} rows: "
                    + ", ".join(f"{k} {v}" for k, v in skipped.items() if v) + ".", stacklevel=2)
    if not rows:
      raise FileNotFoundError(f"dollar_street: no usable rows in {root / self.csv_name}.\n"
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples([r for r in rows if split_of(r["id"]) == split])
            for split in ("train", "test")}

  def _generate_examples(self, rows):
    for r in rows:
      yield r["id"], {"image": r["path"].read_bytes(), "id": r["id"], "topic": r["topic"],
                      "income": np.float32(r["income"]),
                      "income_quartile": r["income_quartile"], "region": r["region"],
                      "country": r["country"]}


def _builder(data_dir, csv_name: str = DEFAULT_CSV) -> DollarStreet:
  return DollarStreet(data_dir=None if data_dir is None else os.fspath(data_dir),
                      file_format="array_record", csv_name=csv_name)


def build(manual_dir, data_dir=None, csv_name: str = DEFAULT_CSV) -> str:
  """Prepares Dollar Street from its manual folder; returns the builder's data directory."""
  builder = _builder(data_dir, csv_name)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(os.path.expanduser(os.fspath(manual_dir)))))
  return os.fspath(builder.data_dir)


def data_source(split: str, data_dir=None):
  """Random-access source of a built split (raw TFDS records)."""
  builder = _builder(data_dir)
  if not builder.is_prepared():
    where = data_dir or "the default TFDS data dir"
    raise faces.NotPreparedError(
        f"{NAME} is not prepared under {where}. It needs a manual download:\n"
        f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}then run\n"
        f"  siglip_fair.data.dollar_street.build(manual_dir=..., "
        f"data_dir={os.fspath(data_dir) if data_dir else None!r})")
  return builder.as_data_source(split=split)
