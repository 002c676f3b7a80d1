"""Annotation shards: where M4 reads its examples from, one bounded chunk at a time.

A source is a sequence of shards; a shard has a length and `read(start, stop)`, which returns
the annotation arrays (docs/ARCHITECTURE.md: s [n, m], known [n] or [n, m], y [n, c], w [n, p],
u [n]) of rows [start, stop). M4 walks the shards in order in fixed-size chunks, so memory is
bounded by one chunk (plus one .npz shard's arrays) whatever the number of shards, and the
global index of a row does not depend on how the data are cut into shards.

Kinds of shard:
  ArrayShard    arrays already in memory (`balance(ann, ...)` uses one);
  NpzShard      an `.npz` file written by `write_shards` / `annotate.save_annotations`; multi-hot
                fields may be stored as uint8 (4x smaller; M4 casts on the device); stored
                (uncompressed) members are memory-mapped, compressed ones loaded;
  ParquetShard  a `.parquet` file with one column per field (fixed-size lists for the [n, k]
                fields, scalars for [n] ones), read one row group at a time;
  RecordShard   a random-access record source (e.g. `tfds.data_source(...)` of the synthetic
                world) whose records hold the fields, for annotations kept next to the images.
"""
from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from siglip_fair.balance import inputs
from siglip_fair.io import atomic_savez, atomic_write

FIELDS = inputs.FIELDS
_MULTI_HOT = inputs.MULTI_HOT
_FIX = "rewrite the shard with balance.write_shards (docs/ARCHITECTURE.md, Annotations)"


class Shard(Protocol):
  def __len__(self) -> int: ...
  def read(self, start: int, stop: int) -> dict[str, np.ndarray]: ...


class ArrayShard:
  """In-memory annotation arrays (no copy). `specs` (shapes, dtypes) are checked before any
  pass (`stream.Plan`), so a field with more rows than 's' is refused, never cut."""

  def __init__(self, ann: Mapping[str, Any]):
    if "s" not in ann:
      raise ValueError("annotations need 's' [N, m] (docs/ARCHITECTURE.md); got keys "
                       f"{sorted(ann)}.")
    self.arrays = {k: np.asarray(v) for k, v in ann.items() if k in FIELDS}
    self.specs = {k: (v.shape, v.dtype) for k, v in self.arrays.items()}
    s = self.arrays["s"]
    self._n = len(s) if s.ndim else 0

  def __len__(self):
    return self._n

  def read(self, start, stop):
    return {k: v[start:stop] for k, v in self.arrays.items()}


def _read_header(f):
  """(shape, fortran_order, dtype) of the .npy whose magic starts at f's position, or None
  for header versions other than 1.0 / 2.0."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return None


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every array of an .npz from its member headers, without reading the
  data (nor unpickling anything)."""
  headers = {}
  with zipfile.ZipFile(path) as z:
    for name in z.namelist():
      if not name.endswith(".npy"):
        continue
      with z.open(name) as f:
        header = _read_header(f)
        if header is None:  # rare (non-latin-1 field names): read the array itself
          array = np.lib.format.read_array(f, allow_pickle=False)
          header = (array.shape, None, array.dtype)
      headers[name[:-4]] = (header[0], header[2])
  return headers


def _stored_views(path: str) -> dict[str, np.ndarray] | None:
  """Read-only memory maps of the annotation arrays of an uncompressed .npz (what
  `np.savez` writes), or None when a member is compressed or unusual (then `np.load`).

  Mapping skips the copy through zipfile and its CRC pass, most of the cost of a pass over
  binary annotations; values are still checked by M4's totals pass.
  """
  views = {}
  with zipfile.ZipFile(path) as z, open(path, "rb") as f:
    for info in z.infolist():
      name = info.filename[:-4] if info.filename.endswith(".npy") else None
      if name not in FIELDS:
        continue
      if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed, encrypted
        return None
      f.seek(info.header_offset)
      local = f.read(30)
      if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
      name_len, extra_len = struct.unpack("<HH", local[26:30])
      start = info.header_offset + 30 + name_len + extra_len
      f.seek(start)
      header = _read_header(f)
      if header is None:
        return None
      shape, fortran, dtype = header
      offset = f.tell()
      if dtype.hasobject or offset - start + dtype.itemsize * int(np.prod(shape)) > info.file_size:
        return None
      views[name] = (np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")
                     if int(np.prod(shape)) else np.zeros(shape, dtype))
  return views


class NpzShard:
  """One .npz annotation file; arrays are mapped (or loaded) on the first `read` of a pass and
  kept until a read starts at row 0 of another shard (M4 reads shards front to back)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"annotation shard {self.path!r} does not exist.")
    try:
      headers = _npz_headers(self.path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise ValueError(f"annotation shard {self.path!r} is not a readable .npz file ({e}); "
                       "rewrite it with balance.write_shards.") from None
    pickled = sorted(k for k, (_, dtype) in headers.items() if dtype.hasobject)
    if pickled:
      raise ValueError(f"annotation shard {self.path!r} holds pickled Python objects in "
                       f"{pickled}, which are never loaded (allow_pickle=False: a pickle can run "
                       "code, so the file is not trusted); save plain numeric arrays, e.g. "
                       "with balance.write_shards.")
    if "s" not in headers:
      raise ValueError(f"annotation shard {self.path!r} has no 's' array; it has "
                       f"{sorted(headers)}.")
    self.specs = {k: v for k, v in headers.items() if k in FIELDS}
    inputs.check_shapes(self.specs, where=f"annotation shard {self.path!r}: ", fix=_FIX)
    self._n = headers["s"][0][0]
    self._cache = None

  def __len__(self):
    return self._n

  def load(self) -> dict[str, np.ndarray]:
    arrays = _stored_views(self.path)
    if arrays is None:
      with np.load(self.path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k in FIELDS}
    for name, x in arrays.items():
      if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        raise ValueError(
            f"annotation shard {self.path!r}: {name!r} has {int(bad.sum())} row(s) with "
            f"NaN or inf values (first: row {int(np.argmax(bad))} of the shard); fix or drop "
            "those rows and rewrite the shard.")
    return arrays

  def read(self, start, stop):
    if self._cache is None or start == 0:
      self._cache = self.load()
    out = {k: v[start:stop] for k, v in self._cache.items()}
    if stop >= self._n:
      self._cache = None  # the pass is past this shard: free it
    return out


class ParquetShard:
  """One .parquet annotation file, read by row group: memory holds one row group, not the file.

  Columns named like the fields; [n, k] fields are fixed-size (or equal-length) list columns.
  """

  def __init__(self, path: str | os.PathLike):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"annotation shard {self.path!r} does not exist.")
    try:
      self._file = pq.ParquetFile(self.path)
    except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several kinds
      raise ValueError(f"annotation shard {self.path!r} is not a readable .parquet file "
                       f"({e}).") from None
    names = self._file.schema_arrow.names
    if "s" not in names:
      raise ValueError(f"annotation shard {self.path!r} has no 's' column; it has {names}.")
    self.columns = [c for c in FIELDS if c in names]
    meta = self._file.metadata
    self._starts = np.cumsum([0] + [meta.row_group(i).num_rows
                                    for i in range(meta.num_row_groups)])
    self._n = int(self._starts[-1])
    self._cached = (None, None)  # (row group index, arrays)

  def __len__(self):
    return self._n

  def _column(self, table, name):
    column = table.column(name).combine_chunks()
    if hasattr(column, "flatten"):  # list column -> [rows, k]
      values = column.flatten().to_numpy(zero_copy_only=False)
      if len(column) and values.size % len(column):
        raise ValueError(f"{self.path!r}: column {name!r} has lists of different lengths; "
                         "every row needs the same number of groups / labels / proxies.")
      return values.reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)

  def _group(self, i):
    if self._cached[0] != i:
      table = self._file.read_row_group(i, columns=self.columns)
      self._cached = (i, {c: self._column(table, c) for c in self.columns})
    return self._cached[1]

  def read(self, start, stop):
    parts = []
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    for i in range(first, len(self._starts) - 1):
      lo, hi = self._starts[i], self._starts[i + 1]
      if lo >= stop:
        break
      arrays = self._group(i)
      parts.append({k: v[max(start, lo) - lo:min(stop, hi) - lo] for k, v in arrays.items()})
    if stop >= self._n:
      self._cached = (None, None)
    return {k: np.concatenate([p[k] for p in parts]) for k in self.columns} if parts else {}


class RecordShard:
  """A random-access source of example dicts (`len`, `[i]`) with the annotation fields."""

  def __init__(self, source, fields: Sequence[str] = ("s", "y", "w"), known_from_s: bool = True):
    self.source, self.fields, self.known_from_s = source, tuple(fields), known_from_s
    if "s" not in self.fields:
      raise ValueError(f"RecordShard fields {self.fields} must include 's'.")

  def __len__(self):
    return len(self.source)

  def read(self, start, stop):
    rows = [self.source[i] for i in range(start, stop)]
    out = {f: np.stack([np.asarray(r[f]) for r in rows]) if rows else None for f in self.fields}
    if not rows:
      return {}
    if self.known_from_s and "known" not in out:
      out["known"] = (out["s"].sum(-1) > 0).astype(np.uint8)  # no group recorded: unknown
    return out


def as_shards(source) -> list:
  """Shards from: an annotation dict, one path (.npz or .parquet), a directory of such files
  (sorted by name = global row order), or a list of shards / paths / dicts."""
  if isinstance(source, Mapping):
    return [ArrayShard(source)]
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"annotation source {path!r} does not exist; annotations_dir must be a folder of "
          ".npz or .parquet annotation shards (balance.write_shards writes them), or one "
          "such file.")
    if os.path.isdir(path):
      files = sorted(f for f in os.listdir(path)
                     if f.endswith((".npz", ".parquet")) and not f.startswith("."))
      if not files:
        raise ValueError(f"no .npz or .parquet annotation shards in directory {path!r}.")
      return [_file_shard(os.path.join(path, f)) for f in files]
    return [_file_shard(path)]
  shards = [s if hasattr(s, "read") else as_shards(s)[0] for s in source]
  if not shards:
    raise ValueError("no annotation shards given.")
  return shards


def _file_shard(path: str):
  return ParquetShard(path) if path.endswith(".parquet") else NpzShard(path)


def iter_chunks(shards: Sequence[Shard], chunk_size: int
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(global offset, arrays of <= chunk_size rows) over all shards, in order.

  A chunk never spans two shards, so at most one shard is being read at any time.
  """
  offset = 0
  for shard in shards:
    n = len(shard)
    for start in range(0, n, chunk_size):
      stop = min(n, start + chunk_size)
      yield offset + start, shard.read(start, stop)
    offset += n


def _compact(name: str, x: np.ndarray) -> np.ndarray:
  """Multi-hot fields as uint8 when that loses nothing."""
  x = np.asarray(x)
  if name in _MULTI_HOT and x.dtype != np.uint8 and x.size and np.all((x == 0) | (x == 1)):
    return x.astype(np.uint8)
  return x


def write_shards(ann: Mapping[str, Any], directory: str | os.PathLike, num_shards: int,
                 prefix: str = "annotations") -> list[str]:
  """Splits annotations into `num_shards` contiguous .npz files, each written atomically.

  Returns the paths, `<prefix>-00000-of-00010.npz`, ... (sorted = global order).
  """
  n = len(np.asarray(ann["s"]))
  if not 1 <= num_shards <= max(n, 1):
    raise ValueError(f"num_shards={num_shards} must be in [1, N={n}].")
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
  paths = []
  for i in range(num_shards):
    path = os.path.join(os.fspath(directory), f"{prefix}-{i:05d}-of-{num_shards:05d}.npz")
    atomic_savez(path, **{k: _compact(k, np.asarray(v)[bounds[i]:bounds[i + 1]])
                          for k, v in ann.items() if k in FIELDS})
    paths.append(path)
  return paths


# Parquet annotation shards named by global row range: what the Beam text annotation and the
# multi-host image annotation write, one file per range, so that any number of workers can
# write their shards independently and `as_shards(directory)` (sorted names) reads them back
# in global row order.
_ROWS_DIGITS = 12  # 10^12 rows: zero-padded so that sorted names are sorted ranges


def shard_name(prefix: str, start: int, stop: int) -> str:
  """File name of the annotation shard of global rows [start, stop):
  `<prefix>-rows-<start:012d>-<stop:012d>.parquet` (sorted names = global row order)."""
  if not 0 <= start <= stop < 10 ** _ROWS_DIGITS:
    raise ValueError(f"shard rows [{start}, {stop}) must satisfy 0 <= start <= stop < 10^12.")
  if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
    raise ValueError(f"shard prefix {prefix!r} must be a non-empty file name that does not "
                     "start with '.' (hidden files are not read as shards).")
  return f"{prefix}-rows-{start:0{_ROWS_DIGITS}d}-{stop:0{_ROWS_DIGITS}d}.parquet"


def _arrow_column(name: str, x: np.ndarray):
  """A pyarrow column for a field: [n] -> scalars, [n, k] -> fixed-size lists of k."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  x = np.ascontiguousarray(_compact(name, x))
  if x.ndim == 1:
    return pa.array(x)
  return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def write_parquet_shard(path: str | os.PathLike, ann: Mapping[str, Any],
                        row_group_size: int = 65536) -> str:
  """Writes annotation arrays (the `FIELDS` among ann's keys: s [n, m], known [n] or [n, m],
  y [n, c], w [n, p], u [n]) as one .parquet file that `ParquetShard` reads, atomically
  (written to a hidden temporary name in the same folder, then renamed), so a killed writer
  never leaves a partial shard under `path`. Multi-hot fields are stored as uint8 when they
  are 0/1. Returns the path."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  arrays = {k: np.asarray(ann[k]) for k in FIELDS if k in ann}
  inputs.check_shapes({k: (v.shape, v.dtype) for k, v in arrays.items()},
                      where=f"annotation shard {path!r}: ")
  table = pa.table({k: _arrow_column(k, v) for k, v in arrays.items()})
  buffer = pa.BufferOutputStream()
  pq.write_table(table, buffer, row_group_size=max(1, row_group_size))
  return atomic_write(path, buffer.getvalue().to_pybytes())


def check_coverage(directory: str | os.PathLike, n: int | None = None,
                   prefix: str = "annotations") -> list[tuple[int, int, str]]:
  """Checks that the shards `shard_name(prefix, ...)` in `directory` cover rows [0, n)
  (n None: [0, last stop)) exactly once, in order, and that each holds as many rows as its
  name says. Returns [(start, stop, path)] sorted; raises ValueError naming the first gap,
  overlap, stray annotation file (which `as_shards(directory)` would also read) or row count
  that does not match."""
  import re  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"annotation shard folder {directory!r} does not exist.")
  pattern = re.compile(re.escape(prefix) + r"-rows-(\d{12})-(\d{12})\.parquet")
  ranges, stray = [], []
  for f in sorted(os.listdir(directory)):
    if f.startswith(".") or not f.endswith((".npz", ".parquet")):
      continue
    match = pattern.fullmatch(f)
    if match is None:
      stray.append(f)
    else:
      ranges.append((int(match[1]), int(match[2]), os.path.join(directory, f)))
  if stray:
    raise ValueError(f"{directory!r} holds annotation files not named "
                     f"{shard_name(prefix, 0, 0).replace('0' * _ROWS_DIGITS, '<row>')}: "
                     f"{stray[:3]}; as_shards would read them too, so move them elsewhere.")
  if not ranges and n != 0:
    raise ValueError(f"no annotation shards {prefix}-rows-*.parquet in {directory!r}.")
  expected = 0
  for start, stop, path in ranges:
    name = os.path.basename(path)
    if start > expected:
      raise ValueError(f"{directory!r}: rows [{expected}, {start}) are missing (gap before "
                       f"{name}); rerun the annotation to write them.")
    if start < expected:
      raise ValueError(f"{directory!r}: {name} overlaps the shards before it (rows [{start}, "
                       f"{expected}) twice); delete the shards of one of the two runs.")
    rows = len(ParquetShard(path))
    if rows != stop - start:
      raise ValueError(f"{path!r} holds {rows} rows but its name says {stop - start} "
                       f"([{start}, {stop})); delete it and rerun the annotation.")
    expected = stop
  if n is not None and expected != n:
    raise ValueError(f"{directory!r}: shards cover rows [0, {expected}) but the dataset has "
                     f"{n} rows" + (f"; rows [{expected}, {n}) are missing." if expected < n
                                    else "; they hold more rows than the dataset."))
  return ranges
