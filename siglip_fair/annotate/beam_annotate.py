"""Text annotation of an imported corpus as an Apache Beam pipeline, into parquet shards.

The rows [0, N) of a dataset written by `data.imports` / `data.beam_import` are cut every
`shard_size` rows by global index; each range is one unit of work: read its captions, annotate
them with the lexicon (`lexicon.annotate_captions`, as `annotate_split` does in memory), take
the utility u from a column given alongside (e.g. a CLIP score; zeros without one) and write
`shards.shard_name(prefix, start, stop)` with `shards.write_parquet_shard` (atomic). So:

  * the shards equal the in-memory annotation of the same captions (s, known, y, w stored as
    uint8 0/1, u float32), whatever the runner or the number of workers: the cut and the
    annotation of a row do not depend on either;
  * a rerun skips the ranges whose file exists (a file exists only once whole) and writes the
    rest; the settings of the first run (rows, cut, lexicon, caption index, utility source)
    are kept in `MANIFEST` and must match, so a folder never mixes two annotations;
  * M4 streams the folder (`balance.shards.as_shards`, `--config.annotations_dir`), and
    `annotate.multihost.combine_shards` joins it with the image-side shards by row index.

    python -m siglip_fair.annotate.beam_annotate ~/tfds/web_pairs/1.0.0 --output ann/text \
        --direct_num_workers=2 --direct_running_mode=multi_processing

Unknown options are Beam PipelineOptions (`--runner=DataflowRunner --project=...`); the dataset,
the utility file and the output are opened with ordinary file I/O on the workers.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence

import apache_beam as beam
import ml_collections
import numpy as np

from siglip_fair.annotate import lexicon as lexicon_lib
from siglip_fair.annotate import resume
from siglip_fair.balance import shards as shards_lib
from siglip_fair.io import atomic_write

MANIFEST = "text_annotation.json"  # not .npz/.parquet: never read as a shard
PREFIX = "annotations"  # what multihost.combine_shards takes as the text side by default


@functools.lru_cache(maxsize=4)
def open_captions(dataset: str):
  """Random-access records (captions and key; images left encoded) of an imported dataset,
  opened once per worker process."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import read_only_builder  # pylint: disable=g-import-not-at-top
  builder = read_only_builder.builder_from_directory(os.path.expanduser(dataset))
  return builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})


def captions_of(dataset: str, start: int, stop: int, caption_index: int
                ) -> tuple[list[bytes], list[str]]:
  """(caption `caption_index` of rows [start, stop), cyclic over a row's captions as
  `imports.read_captions` pads them; the rows' keys, e.g. '00000.tar/000000123')."""
  source = open_captions(dataset)
  records = source.__getitems__(list(range(start, stop)))
  out, keys = [], []
  for row, record in zip(range(start, stop), records):
    captions = [bytes(c) for c in record["captions"]]
    if not captions:
      raise ValueError(f"{dataset!r} row {row} has no caption.")
    out.append(captions[caption_index % len(captions)])
    key = record["key"]
    keys.append(key.decode("utf-8") if isinstance(key, bytes) else str(key))
  return out, keys


@functools.lru_cache(maxsize=8)
def _img2dataset_column(directory: str, tar_name: str, column: str) -> dict[str, float]:
  """{sample key: value} of `column` in img2dataset's metadata of one tar shard
  (`<directory>/<tar stem>.parquet`, whose `key` column names the tar members' stems)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, os.path.splitext(tar_name)[0] + ".parquet")
  if not os.path.exists(path):
    raise FileNotFoundError(f"utility: no img2dataset metadata {path!r} for shard {tar_name}.")
  names = pq.read_schema(path).names
  if "key" not in names or column not in names:
    raise ValueError(f"utility: {path!r} needs columns 'key' and {column!r}; it has {names}.")
  table = pq.read_table(path, columns=["key", column])
  return dict(zip(table.column("key").to_pylist(),
                  table.column(column).to_numpy(zero_copy_only=False)))


def utility_of(utility: tuple[str, str | None], start: int, stop: int,
               keys: Sequence[str]) -> np.ndarray:
  """float32 [stop - start] utility of rows [start, stop): by row from a .npy / parquet column
  in dataset order, or by key from img2dataset's per-shard parquet files (a folder)."""
  path, column = utility
  if os.path.isdir(path):
    u = np.empty(len(keys), np.float32)
    for i, key in enumerate(keys):
      tar_name, _, stem = key.partition("/")
      values = _img2dataset_column(path, tar_name, column)
      if stem not in values:
        raise ValueError(f"utility: row {start + i} (key {key!r}) has no {column!r} in "
                         f"{path!r}'s metadata of {tar_name}.")
      u[i] = values[stem]
  else:
    u = np.asarray(_utility_column(path, column)[start:stop], np.float32)
  if not np.all(np.isfinite(u)):
    bad = int(np.argmax(~np.isfinite(u)))
    raise ValueError(f"utility {path!r} is not finite at row {start + bad} (NaN or inf; a "
                     "sample without a score needs one, e.g. the column's mean).")
  return u


@functools.lru_cache(maxsize=4)
def _utility_column(path: str, column: str | None) -> np.ndarray:
  """float32 [N] utility: a .npy array, or `column` of a .parquet file (one row per example,
  in dataset order); memory-mapped for .npy."""
  if path.endswith(".npy"):
    u = np.load(path, mmap_mode="r", allow_pickle=False)
  else:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    if not column:
      raise ValueError(f"utility {path!r}: name the parquet column, e.g. {path}:similarity.")
    names = pq.read_schema(path).names
    if column not in names:
      raise ValueError(f"utility {path!r} has no column {column!r}; it has {names}.")
    u = pq.read_table(path, columns=[column]).column(column).to_numpy()
  if u.ndim != 1:
    raise ValueError(f"utility {path!r} has shape {u.shape}; it must be [N], one per row.")
  return u


def split_utility(spec: str | None) -> tuple[str, str | None] | None:
  """'file.npy', 'file.parquet:column' or 'folder:column' (img2dataset's per-shard parquet
  files, joined by key) -> (path, column); None -> None."""
  if not spec:
    return None
  path, column = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and (head.endswith(".parquet") or os.path.isdir(os.path.expanduser(head))):
    path, column = head, tail
  path = os.path.expanduser(path)
  if os.path.isdir(path) and not column:
    raise ValueError(f"utility folder {path!r}: name the column, e.g. {path}:similarity.")
  return path, column


def annotate_range(bounds: tuple[int, int], *, dataset: str, out_dir: str, prefix: str,
                   lexicon: ml_collections.ConfigDict, caption_index: int,
                   utility: tuple[str, str | None] | None) -> tuple[int, int, bool]:
  """Annotates rows [start, stop) into their shard unless it exists; (start, stop, written)."""
  start, stop = bounds
  path = os.path.join(out_dir, shards_lib.shard_name(prefix, start, stop))
  if os.path.exists(path):
    return start, stop, False
  captions, keys = captions_of(dataset, start, stop, caption_index)
  ann = lexicon_lib.annotate_captions(captions, lexicon)
  ann["u"] = (np.zeros(stop - start, np.float32) if utility is None
              else utility_of(utility, start, stop, keys))
  shards_lib.write_parquet_shard(path, ann)
  return start, stop, True


def _settings(dataset, n, shard_size, prefix, lexicon, caption_index, utility) -> dict:
  lex = hashlib.sha256(lexicon.to_json(sort_keys=True).encode()).hexdigest()
  info = os.path.join(os.path.expanduser(dataset), "dataset_info.json")
  ident = None
  if os.path.exists(info):
    with open(info, "rb") as f:
      ident = hashlib.sha256(f.read()).hexdigest()
  return {"dataset": os.path.abspath(os.path.expanduser(dataset)), "dataset_info": ident,
          "rows": n, "shard_size": shard_size, "prefix": prefix, "lexicon": lex,
          "caption_index": caption_index,
          "utility": None if utility is None else [os.path.abspath(utility[0]), utility[1]]}


def annotate_text(dataset: str, out_dir: str, *, shard_size: int = 100_000,
                  prefix: str = PREFIX, lexicon: ml_collections.ConfigDict | None = None,
                  caption_index: int = 0, utility: tuple[str, str | None] | None = None,
                  beam_args: Sequence[str] = ()) -> list[tuple[int, int, str]]:
  """Writes the text annotations of every row of `dataset` (an imported dataset's folder) to
  `out_dir` as parquet shards of `shard_size` rows, with a Beam pipeline (runner and options
  from `beam_args`); ranges whose shard exists are skipped. utility: (path, column) of the u
  column (.npy [N] or a parquet column), None for zeros. Returns check_coverage's ranges."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  lexicon = lexicon if lexicon is not None else lexicon_lib.default_lexicon_config()
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size} must be >= 1.")
  if caption_index < 0:
    raise ValueError(f"caption_index={caption_index} must be >= 0.")
  if not os.path.exists(os.path.join(os.path.expanduser(dataset), "dataset_info.json")):
    raise FileNotFoundError(f"{dataset!r} is not an imported dataset (no dataset_info.json); "
                            "give the folder <data_dir>/<name>/1.0.0 that the import wrote.")
  n = len(open_captions(dataset))
  if utility is not None and not os.path.isdir(utility[0]):
    rows = len(_utility_column(*utility))
    if rows != n:
      raise ValueError(f"utility {utility[0]!r} has {rows} rows but {dataset!r} has {n}; it "
                       "needs one value per row, in dataset order.")
  for field in ("s", "y", "w"):  # a bad lexicon fails here, not on every worker
    lexicon_lib._field_matcher(lexicon[field], field)  # pylint: disable=protected-access
  os.makedirs(out_dir, exist_ok=True)
  settings = _settings(dataset, n, shard_size, prefix, lexicon, caption_index, utility)
  manifest = os.path.join(out_dir, MANIFEST)
  if not resume.check_settings(manifest, settings):
    atomic_write(manifest, json.dumps(settings, indent=1))
  ranges = resume.shard_ranges(n, shard_size)
  todo = [r for r in ranges
          if not os.path.exists(os.path.join(out_dir, shards_lib.shard_name(prefix, *r)))]
  print(f"beam annotate: {len(ranges) - len(todo)} of {len(ranges)} shards already in "
        f"{out_dir}; annotating {len(todo)}")
  if todo:
    with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
      _ = (p
           | "Ranges" >> beam.Create(todo)
           | "Spread" >> beam.Reshuffle()
           | "Annotate" >> beam.Map(annotate_range, dataset=os.path.expanduser(dataset),
                                    out_dir=out_dir, prefix=prefix, lexicon=lexicon,
                                    caption_index=caption_index, utility=utility))
  return shards_lib.check_coverage(out_dir, n, prefix)


def in_memory(dataset: str, *, lexicon=None, caption_index: int = 0,
              utility: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The reference: `annotate_split` (source 'text') of the dataset's captions in one process,
  u from `utility` (or zeros)."""
  from siglip_fair import annotate  # pylint: disable=g-import-not-at-top
  from siglip_fair.data import imports  # pylint: disable=g-import-not-at-top
  cfg = annotate.default_config()
  cfg.source, cfg.caption_index = "text", caption_index
  if lexicon is not None:
    cfg.lexicon = lexicon
  ann = annotate.annotate_split({"captions": imports.read_captions(dataset)}, cfg)
  if utility is not None:
    ann["u"] = np.asarray(utility, np.float32)
  return ann


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from siglip_fair import config as cfglib  # pylint: disable=g-import-not-at-top
  from siglip_fair.config.loading import ConfigError, split_override_args  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog="python -m siglip_fair.annotate.beam_annotate",
      description="Annotate the captions of an imported dataset with the text lexicon (Apache "
                  "Beam) into parquet annotation shards by global row range, which M4 streams "
                  "(--config.annotations_dir). Finished shards are skipped on a rerun. Other "
                  "options are Beam pipeline options, e.g. --runner=DataflowRunner or "
                  "--direct_num_workers=2 --direct_running_mode=multi_processing.")
  p.add_argument("dataset", help="the imported dataset's folder (<data_dir>/<name>/1.0.0).")
  p.add_argument("--output", required=True, help="folder of the annotation shards.")
  p.add_argument("--shard_size", type=int, default=100_000, help="rows per shard.")
  p.add_argument("--prefix", default=PREFIX)
  p.add_argument("--utility", default=None, help="u per row (e.g. a CLIP score; default zeros): "
                 "FILE.npy or FILE.parquet:COLUMN in dataset order, or FOLDER:COLUMN for "
                 "img2dataset's per-shard parquet files (FOLDER/<tar stem>.parquet with 'key'), "
                 "joined by the records' keys.")
  p.add_argument("--config", default=None, help="FILE.py[:ARG] whose `annotate` group "
                 "(lexicon, caption_index) is used, with --config.annotate.<key>=... overrides "
                 "(default: annotate.default_config()).")
  try:
    overrides, rest = split_override_args(sys.argv[1:] if argv is None else argv)
    args, beam_args = p.parse_known_args(rest)
    if args.config or overrides:
      if not args.config:
        raise ConfigError("--config.<key> overrides need --config FILE.py.")
      cfg = cfglib.get_config(args.config, overrides).annotate
    else:
      from siglip_fair import annotate  # pylint: disable=g-import-not-at-top
      cfg = annotate.default_config()
    if cfg.source != "text":
      raise ValueError(f"annotate.source={cfg.source!r}: this pipeline writes the text side; "
                       "image annotation is `python -m siglip_fair.annotate.multihost images`.")
    ranges = annotate_text(args.dataset, args.output, shard_size=args.shard_size,
                           prefix=args.prefix, lexicon=cfg.lexicon,
                           caption_index=cfg.caption_index,
                           utility=split_utility(args.utility), beam_args=beam_args)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"beam annotate: error: {e}", file=sys.stderr)
    return 1
  print(f"beam annotate: {len(ranges)} shards cover rows [0, {ranges[-1][1] if ranges else 0}) "
        f"in {args.output}")
  return 0


if __name__ == "__main__":
  from siglip_fair.annotate import beam_annotate as _beam_annotate  # pylint: disable=g-import-not-at-top
  raise SystemExit(_beam_annotate.main())
