"""grain input pipelines over random-access sources (e.g. `tfds.data_source`).

Train: `train_dataset` -> infinite `grain.IterDataset` of process-local batches
  image  float32 [b, H, W, 3] in [-1, 1]
  text   int32   [b, L]  (0 = padding)
  weight float32 [b]     (per-example loss weight, 1.0 by default)
  index  int64   [b]     (index into the original source, for auditing)
with b = global_batch_size // process_count.

Eval: `eval_batches` -> finite, in-order `grain.MapDataset` of fixed-size
batches whose last batch is padded; `mask` bool [b] marks real examples.

Balancing hooks in through `KeptSource`: a keep mask drops examples, repeat
counts duplicate them, and weights attach a per-example `weight`.

Checkpointing: iterators from `iter(train_dataset(...))` support
`get_state()`/`set_state()`, and save/restore through orbax with
`ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))` /
`grain.checkpoint.CheckpointRestore(it)`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np


class _TextEncoder(Protocol):
  def encode(self, texts: Sequence[str | bytes]) -> np.ndarray: ...


def keep_to_indices(keep: np.ndarray, num_records: int) -> np.ndarray:
  """Maps a keep mask (bool [N]) or repeat counts (int [N]) to source indices.

  Returns:
    int64 [M]: `flatnonzero(keep)` for a mask, `repeat(arange(N), keep)` for
    counts, so index i appears keep[i] times.
  """
  keep = np.asarray(keep)
  if keep.shape != (num_records,):
    raise ValueError(
        f"keep has shape {keep.shape} but the source has {num_records} records;"
        " pass one bool (keep mask) or int (repeat count) per record.")
  if keep.dtype == np.bool_:
    return np.flatnonzero(keep).astype(np.int64)
  if not np.issubdtype(keep.dtype, np.integer):
    raise ValueError(
        f"keep has dtype {keep.dtype}; use bool (mask) or int (repeat counts). "
        "Turn keep probabilities into a mask first (e.g. M4Result.keep).")
  if np.any(keep < 0):
    raise ValueError("keep repeat counts must be >= 0.")
  return np.repeat(np.arange(num_records, dtype=np.int64), keep)


class KeptSource:
  """Random-access view of `source[indices[i]]`, tagged with index and weight.

  Each record is the source's dict plus `index` (int64, the original source
  index) and `weight` (float32, `weights[index]`, default 1.0).

  Args:
    source: random-access source of dict records (`__len__`, `__getitem__`).
    indices: int [M] indices into `source` (subset and/or repetition); None
      keeps every record once. See `keep_to_indices`.
    weights: float [N] over the ORIGINAL source indices, finite and >= 0.
  """

  def __init__(self, source, indices: np.ndarray | None = None,
               weights: np.ndarray | None = None):
    n = len(source)
    if indices is None:
      indices = np.arange(n, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(
          f"indices must be a 1-D integer array, got {indices.dtype} "
          f"{indices.shape}; use keep_to_indices() for masks/counts.")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise ValueError(f"indices must lie in [0, {n}) (the source's length).")
    if weights is None:
      weights = np.ones(n, np.float32)
    weights = np.asarray(weights, np.float32)
    if weights.shape != (n,):
      raise ValueError(
          f"weights has shape {weights.shape}; need one weight per ORIGINAL "
          f"record, shape ({n},).")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
      raise ValueError("weights must be finite and >= 0.")
    self._source = source
    self._indices = indices.astype(np.int64)
    self._weights = weights

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    j = int(self._indices[i])
    return {**self._source[j], "index": np.int64(j),
            "weight": self._weights[j]}

  def __repr__(self) -> str:
    return (f"KeptSource(source={self._source!r}, "
            f"len={len(self)} of {len(self._source)})")


class InMemorySource:
  """A random-access source held in memory: one stacked numpy array per field.

  For data sets that fit in RAM (the synthetic world, evaluation splits), reading every record
  once with `__getitems__` and serving slices afterwards removes the per-record decode from the
  training loop. Records are the same dicts the wrapped source returns (restricted to `fields`).
  """

  def __init__(self, source, fields: Sequence[str] | None = None, chunk: int = 4096):
    n = len(source)
    if n == 0:
      raise ValueError("InMemorySource: the source is empty.")
    fields = list(fields or source[0].keys())
    parts = {f: [] for f in fields}
    for start in range(0, n, chunk):
      keys = list(range(start, min(start + chunk, n)))
      records = (source.__getitems__(keys) if hasattr(source, "__getitems__")
                 else [source[i] for i in keys])
      for f in fields:
        parts[f].extend(r[f] for r in records)
    self._arrays = {f: np.stack(v) for f, v in parts.items()}
    self._len = n

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    return self._arrays

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {f: a[i] for f, a in self._arrays.items()}

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in keys]

  def __repr__(self) -> str:
    return f"InMemorySource(len={self._len}, fields={sorted(self._arrays)})"


def workers_needed(batch_size: int, step_time_s: float, images_per_s_per_worker: float,
                   headroom: float = 1.2) -> int:
  """Input workers (grain threads or processes) that keep a device step of `step_time_s`
  fed with `batch_size` examples: ceil(headroom * batch_size / (step_time_s * rate)), at least 1.

  `images_per_s_per_worker` is one worker's measured decode + preprocess rate
  (benchmarks/input_bench.py); `headroom` > 1 covers jitter and the host's other work. Workers
  beyond the host's free cores do not add throughput, so compare the answer with those.
  """
  for name, value in (("batch_size", batch_size), ("step_time_s", step_time_s),
                      ("images_per_s_per_worker", images_per_s_per_worker)):
    if not (isinstance(value, (int, float, np.number)) and np.isfinite(value) and value > 0):
      raise ValueError(f"workers_needed: {name}={value!r} must be a finite number > 0.")
  if not (np.isfinite(headroom) and headroom >= 1):
    raise ValueError(f"workers_needed: headroom={headroom!r} must be >= 1.")
  needed = headroom * batch_size / (step_time_s * images_per_s_per_worker)
  # The tiny tolerance keeps an exact integer ratio from rounding up by float error.
  return max(1, math.ceil(needed - 1e-9))


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    # Float images would be rescaled a second time and silently give garbage embeddings.
    raise ValueError(f"Images must be uint8 [H, W, 3] as stored in the source, got "
                     f"{image.dtype}.")
  return image.astype(np.float32) / 127.5 - 1.0


def _train_example(record: Mapping[str, Any], rng: np.random.Generator, *, image_key: str,
                   caption_key: str) -> dict[str, Any]:
  captions = np.atleast_1d(record[caption_key])
  return {
      "image": normalize_image(record[image_key]),
      "text": captions[rng.integers(len(captions))],  # tokenized per batch (`_tokenize`)
      "weight": np.float32(record["weight"]),
      "index": np.int64(record["index"]),
  }


def _tokenize(batch: dict[str, Any], *, tokenizer: _TextEncoder) -> dict[str, Any]:
  """The batch's chosen captions [b] -> int32 [b, L]. One `encode` call per batch, not per
  example: the tokenizer's per-call Python cost was 95 µs an example against 4 µs batched
  (sentencepiece, the demo's captions), a quarter of the input pipeline's time."""
  return dict(batch, text=tokenizer.encode(list(batch["text"])))


def train_dataset(
    source,
    *,
    tokenizer: _TextEncoder,
    global_batch_size: int,
    seed: int,
    keep: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    process_index: int = 0,
    process_count: int = 1,
    image_key: str = "image",
    caption_key: str = "captions",
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Infinite, shuffled stream of process-local training batches.

  The global stream is: keep/repeat -> shuffle (reshuffled every epoch) ->
  repeat forever -> pick one of the K captions at random. Both random steps are
  seeded from `seed` and the stream position only, so the stream is a pure
  function of `seed` (and of keep/weights).

  Sharding: process p takes stream positions p, p + P, p + 2P, ... (P =
  process_count). Within every epoch the processes' examples are disjoint and
  together cover the kept data, and at each step the union of the P local
  batches is exactly the global batch a single process (P = 1) would see.

  Args:
    source: random-access source of dict records with `image_key` (uint8
      [H, W, 3]) and `caption_key` (bytes [K] or a single bytes).
    tokenizer: object with `encode(list[str|bytes]) -> int32 [N, L]`.
    global_batch_size: B summed over processes; must divide by process_count.
    seed: seed for shuffling and caption choice.
    keep: optional bool [N] keep mask or int [N] repeat counts.
    weights: optional float [N] per-example weights over the original records.
    process_index, process_count: this process's shard (jax.process_index(),
      jax.process_count() in multi-host training).
    image_key, caption_key: record keys.
    read_options: grain threading/prefetch options.

  Returns:
    An IterDataset of dicts (see module docstring) with b = B // P.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must lie in [0, process_count="
        f"{process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of"
        f" process_count={process_count}.")
  indices = None if keep is None else keep_to_indices(keep, len(source))
  kept = KeptSource(source, indices, weights)
  if not len(kept):
    raise ValueError("No examples left to train on: `keep` drops every record.")

  ds = grain.MapDataset.source(kept).seed(seed).shuffle().repeat()
  # Caption choice before sharding, so its RNG depends on the global stream
  # position, not on process_count.
  ds = ds.random_map(functools.partial(
      _train_example, image_key=image_key, caption_key=caption_key))
  ds = ds[process_index::process_count]
  return ds.to_iter_dataset(read_options).batch(
      global_batch_size // process_count, drop_remainder=True).map(
          functools.partial(_tokenize, tokenizer=tokenizer))


def _eval_example(i: int, *, source, tokenizer: _TextEncoder | None,
                  fields: Sequence[str], image_key: str,
                  caption_key: str) -> dict[str, np.ndarray]:
  n = len(source)
  record = source[min(i, n - 1)]
  out = {}
  for f in fields:
    out[f] = normalize_image(record[f]) if f == image_key else np.asarray(
        record[f])
  if tokenizer is not None:
    captions = np.asarray(record[caption_key])
    out["text"] = tokenizer.encode(captions.ravel().tolist()).reshape(
        captions.shape + (-1,))
  if i >= n:  # Padding: zeros (empty bytes) in the shape of a real example.
    out = {k: np.full_like(v, b"") if v.dtype == object else np.zeros_like(v)
           for k, v in out.items()}
  out["index"] = np.int64(i if i < n else -1)
  out["mask"] = np.bool_(i < n)
  return out


def eval_batches(
    source,
    *,
    batch_size: int,
    tokenizer: _TextEncoder | None = None,
    fields: Sequence[str] = ("image",),
    image_key: str = "image",
    caption_key: str = "captions",
) -> grain.MapDataset:
  """All of `source`, in order, in batches of exactly `batch_size`.

  Each batch holds the requested `fields` (the image field normalised to
  float32 [b, H, W, 3] in [-1, 1], others as stored), `text` int32 [b, K, L]
  (or [b, L] for a single caption) when a tokenizer is given, `index` int64
  [b] (-1 on padding) and `mask` bool [b]. The last batch is padded with zeros
  and mask False, so a jitted evaluator compiles once.

  Returns:
    A re-iterable MapDataset; `len()` is the number of batches.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  n = len(source)
  if not n:
    raise ValueError("eval_batches got an empty source.")
  missing = [f for f in fields if f not in source[0]]
  if tokenizer is not None and caption_key not in source[0]:
    missing.append(caption_key)
  if missing:
    raise ValueError(f"Records have no field(s) {missing}; available: "
                     f"{sorted(source[0])}.")
  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(num_batches * batch_size).map(functools.partial(
      _eval_example, source=source, tokenizer=tokenizer, fields=tuple(fields),
      image_key=image_key, caption_key=caption_key))
  return ds.batch(batch_size)
