"""The corpus import (data/imports.py) as an Apache Beam pipeline: one machine or a cluster.

Same inputs (webdataset tar shards, JSONL/CSV manifests, image folders; and img2dataset's
parquet shards with the images inside, which `imports` does not read), same conversion
(`imports.convert`), same skip-and-count rules, same output: a TFDS ArrayRecord dataset whose
records equal `imports.import_pairs`'s record for record, with the same import_report.json.

How it is distributed and kept deterministic:
  * a *unit* is one input (a tar shard, a manifest file or a folder); units are spread over
    the workers (`beam.Reshuffle`), each worker converts its units with `imports.convert`;
  * every kept record gets the integer key `unit_index * 2**32 + position of its entry in the
    unit`; the builder has `disable_shuffling`, so TFDS's Beam writer sorts by that key: the
    dataset's order is the inputs' order, whatever the number of workers or the runner;
  * a unit's converted records and its skip counts are written, atomically, to
    `<staging>/<unit fingerprint>.parquet`, where the fingerprint hashes what the unit is
    computed from (`imports.fingerprint` of that input: its path, size and mtime, and for a
    manifest every image it names; image_size; FORMAT_VERSION). A rerun (after a kill, or with
    more inputs) reads finished units back instead of converting them again: resumable at
    shard granularity. The report is merged from the units' counts in unit order, so it equals
    the single-process report;
  * the final dataset is built in a staging folder and swapped in, as `import_pairs` does, with
    the same reuse rule (`import_fingerprint.json`).

    python -m siglip_fair.data.beam_import webdataset shards/*.tar --data_dir ~/tfds \
        --name web_pairs --direct_num_workers=2 --direct_running_mode=multi_processing

Options this parser does not know (`--runner`, `--project`, `--region`, `--temp_location`,
`--direct_num_workers`, ...) are Beam PipelineOptions. Inputs, `--data_dir` and `--staging_dir`
are read with ordinary file I/O, so on a cluster they must be on a file system every worker
mounts (docs/WEBSCALE.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from siglip_fair.data import imports
from siglip_fair.io import atomic_write

_MODULE = "siglip_fair.data.beam_import"  # see imports._MODULE
_POSITION_BITS = 32  # entries per unit < 2**32
_EXAMPLES = 5  # skipped keys kept per reason in the report, as imports does
_SCHEMA = pa.schema([("position", pa.int64()), ("key", pa.string()), ("image", pa.binary()),
                     ("captions", pa.list_(pa.binary()))])


def unit_fingerprints(described: dict) -> list[str]:
  """sha256 per input of what its converted records depend on, from the import's fingerprint
  (`imports.fingerprint`: kind, image_size, format and the input's path, size, mtime and, for a
  manifest, its images'), so nothing is stat-ed twice."""
  return [hashlib.sha256(json.dumps({**described, "inputs": [item]}, sort_keys=True).encode()
                         ).hexdigest() for item in described["inputs"]]


def _caption_column(path: str) -> str:
  """The caption column of an img2dataset parquet shard; ValueError unless it has images."""
  try:
    names = pq.read_schema(path).names
  except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several kinds
    raise ValueError(f"{path} is not a readable parquet file ({e}).") from None
  if "jpg" not in names or "key" not in names:
    raise ValueError(f"{path}: an img2dataset parquet shard has columns 'key' and 'jpg' (the "
                     f"images); this one has {names}. The metadata beside webdataset tars has "
                     "no images: import the tars (kind webdataset) instead.")
  text = "txt" if "txt" in names else "caption" if "caption" in names else None
  if text is None:
    raise ValueError(f"{path}: no caption column ('txt' or 'caption'); it has {names}.")
  return text


def parquet_entries(path: str):
  """Entries of a parquet shard written by img2dataset with `--output_format parquet`: one row
  per sample, `key`, the image bytes in `jpg` (null when the download failed; `status` and
  `error_message` say why) and the caption in `txt` (or `caption`). Keys are
  '<file name>/<key>'."""
  text = _caption_column(path)
  base = os.path.basename(path)
  for batch in pq.ParquetFile(path).iter_batches(columns=["key", "jpg", text]):
    for key, image, caption in zip(*(batch.column(i).to_pylist() for i in range(3))):
      if image is None:
        yield f"{base}/{key}", ValueError("not downloaded"), None
      else:
        yield f"{base}/{key}", image, caption


KINDS = (*imports.KINDS, "parquet")


def _entries(kind: str, path: str):
  return {"folder": imports.folder_entries, "manifest": imports.manifest_entries,
          "webdataset": lambda p: imports.webdataset_entries([p]),
          "parquet": parquet_entries}[kind](path)


def convert_unit(kind: str, path: str, image_size: int) -> tuple[pa.Table, dict]:
  """(records of the kept entries in entry order, report {kept, skipped, examples}) of one
  input, converted in this process."""
  rows = {name: [] for name in _SCHEMA.names}
  skipped: dict[str, list[str]] = {}
  for position, entry in enumerate(_entries(kind, path)):
    key, record, reason = imports.convert(entry, image_size)
    if record is None:
      skipped.setdefault(reason, []).append(key)
      continue
    for name, value in (("position", position), ("key", key), ("image", record["image"]),
                        ("captions", record["captions"])):
      rows[name].append(value)
  report = {"kept": len(rows["key"]), "skipped": {r: len(k) for r, k in skipped.items()},
            "examples": {r: k[:_EXAMPLES] for r, k in skipped.items()}}
  return pa.table(rows, schema=_SCHEMA), report


def staged_unit(target: str, kind: str, path: str, image_size: int) -> tuple[pa.Table, dict]:
  """A unit's records and report: read from `target` (its staged file) when a finished
  conversion of the same input is there, else converted and written there atomically."""
  if os.path.exists(target):
    table = pq.read_table(target)
    return table, json.loads(table.schema.metadata[b"report"])
  table, report = convert_unit(kind, path, image_size)
  table = table.replace_schema_metadata({"report": json.dumps(report)})
  buffer = io.BytesIO()
  pq.write_table(table, buffer)
  atomic_write(target, buffer.getvalue())
  return table, report


def _examples_of_unit(item, kind: str, staging: str, image_size: int):
  """(int key, record) of every kept entry of unit `item` = (unit index, path, fingerprint)."""
  index, path, fingerprint = item
  table, _ = staged_unit(os.path.join(staging, fingerprint + ".parquet"), kind, path, image_size)
  base = index << _POSITION_BITS
  for row in table.to_pylist():
    yield base + row["position"], {"image": row["image"], "captions": row["captions"],
                                   "key": row["key"]}


class _ConvertUnits(beam.PTransform):
  """Pipeline root -> PCollection of (int key, record), one unit per element."""

  def __init__(self, kind, units, staging, image_size):
    super().__init__()
    self.kind, self.units, self.staging, self.image_size = kind, units, staging, image_size

  def expand(self, pipeline):
    return (pipeline
            | "Units" >> beam.Create([(i, *unit) for i, unit in enumerate(self.units)])
            | "Spread" >> beam.Reshuffle()  # one unit per worker at a time, not all on one
            | "Convert" >> beam.FlatMap(_examples_of_unit, kind=self.kind, staging=self.staging,
                                        image_size=self.image_size))


class BeamImageTextPairs(imports.ImageTextPairs, skip_registration=True):
  """imports.ImageTextPairs whose examples come from a Beam PTransform (same features, same
  records); `download_and_prepare(download_config=DownloadConfig(beam_runner=...,
  beam_options=...))` picks the runner."""

  def __init__(self, *, kind: str, units: Sequence[tuple[str, str]], staging: str,
               image_size: int = 224, **kwargs):
    """units: (absolute input path, its fingerprint) in input order."""
    self._kind, self._units, self._staging = kind, list(units), staging
    super().__init__(image_size=image_size, **kwargs)

  def _generate_examples(self):
    return _ConvertUnits(self._kind, self._units, self._staging, self._image_size)


def merged_report(staging: str, fingerprints: Sequence[str]) -> dict:
  """The import report of all units, merged in unit order (equal to imports' report)."""
  kept, skipped, examples = 0, {}, {}
  for fingerprint in fingerprints:
    meta = pq.read_schema(os.path.join(staging, fingerprint + ".parquet")).metadata
    report = json.loads(meta[b"report"])
    kept += report["kept"]
    for reason, count in report["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + count
      examples.setdefault(reason, [])
      examples[reason] = (examples[reason] + report["examples"][reason])[:_EXAMPLES]
  return {"kept": kept, "skipped": skipped, "examples": examples}


def pipeline_options(beam_args: Sequence[str] = ()):
  """PipelineOptions from command-line words; with no runner given, DirectRunner."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  return PipelineOptions(list(beam_args))


def beam_import(kind: str, inputs: Sequence[str] | str, data_dir: str, *, name: str,
                image_size: int = 224, beam_args: Sequence[str] = (),
                staging_dir: str | None = None) -> str:
  """Imports `inputs` into the dataset `name` under data_dir with a Beam pipeline (runner and
  options from `beam_args`, e.g. ["--direct_num_workers=2"]); returns its folder. Converted
  units are kept in `staging_dir` (default `<data_dir>/.beam_staging/<name>`) for reruns."""
  if kind not in KINDS:
    raise ValueError(f"import kind={kind!r}; use one of {KINDS}.")
  if image_size < 8:
    raise ValueError(f"image_size={image_size} must be >= 8.")
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  for path in inputs:
    if not os.path.exists(path):
      raise FileNotFoundError(f"import input {path!r} does not exist.")
  if kind == "parquet":
    for path in inputs:
      _caption_column(path)  # on the launcher, before any worker starts
  if len(set(map(os.path.abspath, inputs))) != len(inputs):
    raise ValueError(f"import inputs {inputs} name the same file twice.")
  data_dir = os.path.expanduser(data_dir)
  staging_units = staging_dir or os.path.join(data_dir, ".beam_staging", name)
  out = os.path.join(data_dir, name, str(imports.ImageTextPairs.VERSION))
  wanted = imports.fingerprint(kind, inputs, image_size, skip=data_dir)
  if os.path.exists(out):
    old = imports._read_json(os.path.join(out, "import_fingerprint.json"))  # pylint: disable=protected-access
    if old == wanted and os.path.exists(os.path.join(out, "dataset_info.json")):
      print(f"beam import: reusing {out} (same inputs)")
      return out
    print(f"beam import: {out} was built from other inputs; rebuilding")
  fingerprints = unit_fingerprints(wanted)
  os.makedirs(staging_units, exist_ok=True)
  staging = tempfile.mkdtemp(dir=data_dir, prefix=f".import_{name}.")
  try:
    builder = type(name, (BeamImageTextPairs,), {"name": name, "__module__": _MODULE},
                   skip_registration=True)(
        kind=kind, units=list(zip(map(os.path.abspath, inputs), fingerprints)),
        staging=staging_units,
        image_size=image_size, data_dir=staging, file_format="array_record")
    config = tfds.download.DownloadConfig(beam_options=pipeline_options(beam_args))
    try:
      builder.download_and_prepare(download_config=config)
    except Exception:
      report = _report_or_none(staging_units, fingerprints)
      if report is not None and report["kept"] == 0:
        raise ValueError(
            f"import {name!r}: no usable pairs in {inputs}, every entry was skipped (skipped: "
            f"{report['skipped']}; e.g. {report['examples']}); each image must decode and have "
            "a non-empty UTF-8 caption. Nothing was written.") from None
      raise
    report = merged_report(staging_units, fingerprints)
    staged = os.fspath(builder.data_dir)
    atomic_write(os.path.join(staged, "import_report.json"), json.dumps(report, indent=1))
    atomic_write(os.path.join(staged, "import_fingerprint.json"), json.dumps(wanted, indent=1))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
      os.rename(out, os.path.join(staging, "replaced"))
    os.rename(staged, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  skipped = ", ".join(f"{n} ({r})" for r, n in report["skipped"].items())
  print(f"beam import {name}: kept {report['kept']}, skipped {skipped or 'none'}")
  return out


def _report_or_none(staging, fingerprints):
  try:
    return merged_report(staging, fingerprints)
  except (OSError, KeyError, ValueError):
    return None


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog="python -m siglip_fair.data.beam_import",
      description="Import image-text pairs (webdataset tar shards, JSONL/CSV manifests or "
                  "folders) into a TFDS ArrayRecord dataset with an Apache Beam pipeline; the "
                  "records equal `python -m siglip_fair.data.imports`'s. Other options are Beam "
                  "pipeline options, e.g. --runner=DataflowRunner --project=P --region=R "
                  "--temp_location=gs://B/tmp, or --direct_num_workers=2 "
                  "--direct_running_mode=multi_processing (DirectRunner, the default).")
  imports.add_import_args(
      p, KINDS, kind_help="parquet: img2dataset's --output_format parquet shards (images "
      "inside); the others as in siglip_fair.data.imports.",
      inputs_help="the tar shard(s), manifest file(s) or folder(s); each is one unit of work.")
  p.add_argument("--staging_dir", default=None, help="where converted units are kept for reruns "
                 "(default <data_dir>/.beam_staging/<name>).")
  args, beam_args = p.parse_known_args(argv)
  try:
    path = beam_import(args.kind, args.inputs, args.data_dir, name=args.name,
                       image_size=args.image_size, beam_args=beam_args,
                       staging_dir=args.staging_dir)
  except (ValueError, FileNotFoundError) as e:
    print(f"beam import: error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  from siglip_fair.data import beam_import as _beam_import  # pylint: disable=g-import-not-at-top
  raise SystemExit(_beam_import.main())
