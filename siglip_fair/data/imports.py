"""Image–text corpora into TFDS ArrayRecord datasets that the training pipeline reads.

Three input layouts:
  folder: image files (jpg, jpeg, png, webp) anywhere below a root, each with a caption file of
    the same stem (`cat.jpg` + `cat.txt`, one caption per non-empty line);
  manifest: a JSONL file ({"image": path, "caption": text} or "captions": [texts] per line) or a
    CSV file (columns image, caption), image paths relative to the manifest's folder;
  webdataset: tar shards as written by img2dataset (`000001.jpg` + `000001.txt`, optionally
    `000001.json` with a "caption").
Every image is decoded, converted to RGB, centre-cropped, resized to `image_size` and stored as
JPEG (so records batch without further work), with its captions as `captions` (bytes [K]).
Examples are converted by `num_workers` processes. Undecodable images, missing files, rows
that do not parse and empty or non-UTF-8 captions are counted by reason and skipped, never
fatal, and so are tar members cut short and the unreadable rest of a truncated shard;
`import_report.json` next to the dataset lists the counts and some examples.
Imports are content-addressed: `import_fingerprint.json` records what the dataset was computed
from (kind, image_size, the path, size and mtime of every input file, FORMAT_VERSION); the same
name is reused only while that matches and is otherwise rebuilt in a staging folder and swapped
in, so a failed rebuild leaves the old dataset.

    from siglip_fair.data import imports
    path = imports.import_pairs("webdataset", ["shards/00000.tar"], "~/data", name="laion_s")
    source = imports.data_source(path)            # random access; pipeline.train_dataset(source)

Web scale: `data/beam_import.py` runs the same conversion as an Apache Beam pipeline (one unit
per input, resumable per unit), writing records equal to this module's; docs/WEBSCALE.md.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from siglip_fair.data.builder import CheckedSource
from siglip_fair.io import atomic_write

KINDS = ("folder", "manifest", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_CAPTIONS = 5
# Of the records and the fingerprint: bumping it rebuilds every earlier import once.
FORMAT_VERSION = 1
# The module's import name, also when it runs as __main__: TFDS resolves a builder's package
# from its __module__, and '__main__' is no package.
_MODULE = "siglip_fair.data.imports"
TRUNCATED = "truncated tar member"
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _captions(raw) -> list[bytes] | str:
  """Non-empty UTF-8 captions, or the reason there are none."""
  items = raw if isinstance(raw, (list, tuple)) else [raw]
  out = []
  for item in items:
    if isinstance(item, bytes):
      try:
        item = item.decode("utf-8")
      except UnicodeDecodeError:
        return "caption not UTF-8"
    if not isinstance(item, str):
      return "caption not text"
    for line in item.splitlines():
      if line.strip():
        out.append(line.strip().encode("utf-8"))
  return out[:MAX_CAPTIONS] if out else "empty caption"


def folder_entries(root: str) -> Iterator[tuple[str, object, object]]:
  """(key, image path or bytes or error, caption raw) per image below root."""
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for f in sorted(files):
      stem, ext = os.path.splitext(f)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      key = os.path.relpath(os.path.join(folder, f), root)
      caption_path = os.path.join(folder, stem + ".txt")
      if not os.path.exists(caption_path):
        yield key, ValueError("no caption file"), None
        continue
      with open(caption_path, "rb") as c:
        yield key, os.path.join(folder, f), c.read()


def manifest_entries(path: str) -> Iterator[tuple[str, object, object]]:
  """Entries of a .jsonl or .csv manifest."""
  base = os.path.dirname(os.path.abspath(path))
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".csv"):
    text = data.decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"image", "caption"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}: a CSV manifest needs columns image and caption, has "
                       f"{reader.fieldnames}.")
    rows = ((i, row) for i, row in enumerate(reader))
  else:
    def parse():
      for i, line in enumerate(data.splitlines()):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            raise ValueError
        except ValueError:
          yield i, None
          continue
        yield i, row
    rows = parse()
  for i, row in rows:
    key = f"{os.path.basename(path)}:{i + 1}"
    if row is None or not row.get("image"):
      yield key, ValueError("row does not parse"), None
      continue
    yield key, os.path.join(base, row["image"]), row.get("captions", row.get("caption"))


def _read_tar(shard: str) -> tuple[dict[str, dict[str, bytes | None]], str | None]:
  """Members grouped by stem (None for a member cut short) and why the shard is unreadable past
  them (None when it reaches its end-of-archive marker)."""
  groups: dict[str, dict[str, bytes | None]] = {}
  try:
    tar = tarfile.open(shard)  # pylint: disable=consider-using-with
  except _TAR_ERRORS as e:
    return groups, " ".join(str(e).split())  # one line: it is a key of the report
  with tar:
    try:
      while (member := tar.next()) is not None:
        if not member.isfile():
          continue
        stem, _, ext = member.name.partition(".")
        try:
          data = tar.extractfile(member).read()
        except _TAR_ERRORS:
          data = b""
        groups.setdefault(stem, {})[ext.lower()] = data if len(data) == member.size else None
      # tarfile ends its iteration silently at a cut or garbled header; only a zero block there
      # shows that the archive really ended.
      tar.fileobj.seek(tar.offset)
      end = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _TAR_ERRORS as e:
      end = b"" if "unexpected end" in str(e) else " ".join(str(e).split())
  if isinstance(end, str):
    return groups, end
  if len(end) < tarfile.BLOCKSIZE:
    return groups, "truncated before its end-of-archive marker"
  return groups, None if end.count(0) == tarfile.BLOCKSIZE else "garbled header"


def webdataset_entries(shards: Sequence[str]) -> Iterator[tuple[str, object, object]]:
  """Entries of img2dataset-style tar shards, grouped by member stem."""
  for shard in shards:
    groups, broken = _read_tar(shard)
    last = next(reversed(groups), None)
    for stem, parts in groups.items():
      key = f"{os.path.basename(shard)}/{stem}"
      image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
      caption = parts.get("txt")
      if caption is None and parts.get("json") is not None:
        try:
          caption = json.loads(parts["json"]).get("caption")
        except (ValueError, AttributeError):
          caption = None
      # The pair at a cut may have lost its other member too.
      if None in parts.values() or (broken and stem == last and (image is None or caption is None)):
        yield key, ValueError(TRUNCATED), None
      elif image is None:
        yield key, ValueError("no image"), None
      elif caption is None:
        yield key, ValueError("no caption"), None
      else:
        yield key, image, caption
    if broken:  # the pairs past the cut are unknown, so the shard itself is counted
      yield os.path.basename(shard), ValueError(f"unreadable tar: {broken}"), None


def convert(entry, image_size: int) -> tuple[str, dict | None, str | None]:
  """(key, record or None, reason it was skipped or None); runs in the worker processes."""
  key, image, caption = entry
  if isinstance(image, Exception):
    return key, None, str(image)
  captions = _captions(caption)
  if isinstance(captions, str):
    return key, None, captions
  try:
    raw = image if isinstance(image, bytes) else open(image, "rb").read()  # pylint: disable=consider-using-with
  except OSError:
    return key, None, "missing image file"
  try:
    with PIL.Image.open(io.BytesIO(raw)) as im:
      im = im.convert("RGB")
      s = min(im.size)
      left, top = (im.width - s) // 2, (im.height - s) // 2
      im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size),
                                                           PIL.Image.Resampling.BICUBIC)
      out = io.BytesIO()
      im.save(out, format="JPEG", quality=95)
  except Exception:  # pylint: disable=broad-except  (any decoder failure: a broken image)
    return key, None, "undecodable image"
  return key, {"image": out.getvalue(), "captions": captions, "key": key}, None


# Not registered: only its per-name subclasses hold data, and `python -m` defines it twice
# (as __main__ and as siglip_fair.data.imports), which registration would refuse.
class ImageTextPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Image–text pairs imported from local files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = epath.Path(__file__)  # see builder.py

  def __init__(self, *, entries=None, image_size: int = 224, num_workers: int = 1,
               report: dict | None = None, **kwargs):
    self._entries, self._image_size, self._workers = entries, image_size, num_workers
    self._report = report if report is not None else {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self._image_size, self._image_size, 3),
                                         encoding_format="jpeg"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "key": tfds.features.Text()}),
        disable_shuffling=True)

  # TFDS's lines would name the staging folder that import_pairs renames; it prints its own.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    work = functools.partial(convert, image_size=self._image_size)
    skipped, kept = {}, 0
    with multiprocessing.get_context("spawn").Pool(self._workers) as pool:
      for key, record, reason in pool.imap(work, self._entries, chunksize=16):
        if record is None:
          skipped.setdefault(reason, []).append(key)
          continue
        kept += 1
        yield key, record
    self._report.update(kept=kept, skipped={r: len(k) for r, k in skipped.items()},
                        examples={r: k[:5] for r, k in skipped.items()})


def _stat(path: str) -> list[int] | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def _digest(rows) -> str:
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps(row).encode() + b"\n")
  return h.hexdigest()


def fingerprint(kind: str, inputs: Sequence[str], image_size: int,
                skip: str | None = None) -> dict:
  """What an import is computed from: kind, image_size, FORMAT_VERSION and, per input, its
  absolute path with the size and mtime of the file, of every file below a folder (but `skip`,
  the data_dir, which an import changes) and of every image a manifest names."""
  skip = skip and os.path.abspath(skip)
  described = []
  for path in map(os.path.abspath, inputs):
    item: dict = {"path": path}
    if os.path.isdir(path):
      rows = []
      for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != skip)
        rows += [[os.path.relpath(os.path.join(folder, f), path), _stat(os.path.join(folder, f))]
                 for f in sorted(files)]
      item.update(files=len(rows), digest=_digest(rows))
    else:
      item["stat"] = _stat(path)
      if kind == "manifest":
        images = sorted({i for _, i, _ in manifest_entries(path) if isinstance(i, str)})
        item.update(images=len(images), digest=_digest([i, _stat(i)] for i in images))
    described.append(item)
  return {"format": FORMAT_VERSION, "kind": kind, "image_size": image_size,
          "inputs": described}


def _differences(old: dict | None, new: dict) -> str:
  """What differs between two fingerprints, in a few words."""
  if not isinstance(old, dict):
    return "it has no readable import_fingerprint.json"
  out = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in ("format", "kind", "image_size")
         if old.get(k) != new[k]]
  before = {i.get("path"): i for i in old.get("inputs", [])}
  after = {i["path"]: i for i in new["inputs"]}
  for what, paths in (("added", [p for p in after if p not in before]),
                      ("removed", [p for p in before if p not in after]),
                      ("changed", [p for p in after if p in before and before[p] != after[p]])):
    if paths:
      more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
      out.append(f"{what} {', '.join(map(str, paths[:3]))}{more}")
  return "; ".join(out) or "inputs reordered"


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def import_pairs(kind: str, inputs: Sequence[str] | str, data_dir: str, *, name: str,
                 image_size: int = 224, num_workers: int | None = None) -> str:
  """Converts `inputs` (a folder, a manifest file, or tar shards) into the dataset `name`
  under data_dir; returns its folder. An existing import of the same inputs is reused, one of
  other inputs replaced (see the module docstring)."""
  if kind not in KINDS:
    raise ValueError(f"import kind={kind!r}; use one of {KINDS}.")
  if image_size < 8:
    raise ValueError(f"image_size={image_size} must be >= 8.")
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  for path in inputs:
    if not os.path.exists(path):
      raise FileNotFoundError(f"import input {path!r} does not exist.")
  data_dir = os.path.expanduser(data_dir)
  out = os.path.join(data_dir, name, str(ImageTextPairs.VERSION))
  wanted = fingerprint(kind, inputs, image_size, skip=data_dir)
  if os.path.exists(out):
    old = _read_json(os.path.join(out, "import_fingerprint.json"))
    if old == wanted and os.path.exists(os.path.join(out, "dataset_info.json")):
      print(f"import: reusing {out} (same inputs)")
      return out
    why = _differences(old, wanted) if old != wanted else "it has no dataset_info.json"
    print(f"import: inputs changed since {out} was built ({why}); rebuilding")
  entries = {"folder": lambda: (e for p in inputs for e in folder_entries(p)),
             "manifest": lambda: (e for p in inputs for e in manifest_entries(p)),
             "webdataset": lambda: webdataset_entries(inputs)}[kind]()
  report: dict = {}
  made = not os.path.isdir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  # Built beside the old dataset (same file system, so the swap is two renames) and swapped in
  # only when complete: a failed or killed import leaves the old one.
  staging = tempfile.mkdtemp(dir=data_dir, prefix=f".import_{name}.")
  try:
    # One builder class per dataset name; not registered, so importing twice is fine.
    builder = type(name, (ImageTextPairs,), {"name": name, "__module__": _MODULE},
                   skip_registration=True)(
        entries=entries, image_size=image_size, report=report,
        num_workers=num_workers or max(os.cpu_count() or 1, 1),
        data_dir=staging, file_format="array_record")
    try:
      builder.download_and_prepare()
    except AssertionError:
      # TFDS refuses to finish a split without examples.
      if report.get("kept") == 0:
        raise ValueError(
            f"import {name!r}: no usable pairs in {inputs}, every entry was skipped (skipped: "
            f"{report['skipped']}; e.g. {report['examples']}); each image must decode and have "
            "a non-empty UTF-8 caption. Nothing was written.") from None
      raise
    staged = os.fspath(builder.data_dir)
    atomic_write(os.path.join(staged, "import_report.json"), json.dumps(report, indent=1))
    atomic_write(os.path.join(staged, "import_fingerprint.json"), json.dumps(wanted, indent=1))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
      os.rename(out, os.path.join(staging, "replaced"))
    os.rename(staged, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if made and not os.listdir(data_dir):
      os.rmdir(data_dir)
  skipped = ", ".join(f"{n} ({r})" for r, n in report["skipped"].items())
  print(f"import {name}: kept {report['kept']}, skipped " + (
      f"{skipped}; the skipped entries are listed in {out}/import_report.json (fix them and "
      "import again to include them)" if skipped else "none"))
  return out


def data_source(path: str, split: str = "train"):
  """Random-access source of an imported dataset (records: image uint8 [S, S, 3], captions
  bytes [K], key)."""
  path = os.path.expanduser(path)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"{path!r} is not an imported dataset (no dataset_info.json); "
                            "create one with `python -m siglip_fair.data.imports`.")
  return CheckedSource(read_only_builder.builder_from_directory(path).as_data_source(split=split),
                       f"imported dataset {path!r}",
                       f"delete {path} and import the corpus again")


def image_size(path: str) -> int:
  """Side of the square images of an imported dataset."""
  builder = read_only_builder.builder_from_directory(os.path.expanduser(path))
  return int(builder.info.features["image"].shape[0])


def read_captions(path: str, split: str = "train") -> np.ndarray:
  """object (bytes) [N, K]: every record's captions without decoding its image; records with
  fewer than K captions repeat theirs cyclically (as the COCO loader pads)."""
  builder = read_only_builder.builder_from_directory(os.path.expanduser(path))
  source = CheckedSource(
      builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()}),
      f"imported dataset {path!r}", f"delete {path} and import the corpus again")
  lists = [[bytes(c) for c in source[i]["captions"]] for i in range(len(source))]
  k = max((len(c) for c in lists), default=1)
  out = np.empty((len(lists), k), dtype=object)
  for row, captions in zip(out, lists):
    row[:] = [captions[j % len(captions)] for j in range(k)]
  return out


def add_import_args(parser, kinds, *, kind_help, inputs_help) -> None:
  """The arguments every import command takes (this one and data/beam_import.py's)."""
  parser.add_argument("kind", choices=kinds, help=kind_help)
  parser.add_argument("inputs", nargs="+", help=inputs_help)
  parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into.")
  parser.add_argument("--name", required=True, help="dataset name, e.g. my_pairs.")
  parser.add_argument("--image_size", type=int, default=224)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog="python -m siglip_fair.data.imports",
      description="Import image-text pairs (a folder, JSONL/CSV manifests or webdataset tar "
                  "shards) into a TFDS ArrayRecord dataset; prints kept / skipped counts. The same "
                  "name and inputs reuse the dataset; changed inputs rebuild it.")
  add_import_args(p, KINDS, kind_help=None,
                  inputs_help="the folder, manifest file(s) or tar shard(s).")
  p.add_argument("--workers", type=int, default=None, help="conversion processes (default: all "
                 "cores).")
  args = p.parse_args(argv)
  try:
    path = import_pairs(args.kind, args.inputs, args.data_dir, name=args.name,
                        image_size=args.image_size, num_workers=args.workers)
  except (ValueError, FileNotFoundError) as e:
    print(f"import: error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  # Through the importable module rather than this __main__ copy, so that the builder and the
  # conversion the spawned workers unpickle live in siglip_fair.data.imports (a worker re-runs
  # this file as __mp_main__, where this guard keeps it from importing again).
  from siglip_fair.data import imports as _imports  # pylint: disable=g-import-not-at-top
  raise SystemExit(_imports.main())
