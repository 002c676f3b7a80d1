"""Zero-shot image annotation on many hosts, written as parquet shards by global row range.

Issue 21, item 2. The rows of a random-access image source (the training split, an imported
corpus) are cut into fixed ranges of `shard_size` rows by global index: [0, k), [k, 2k), ...
Range i belongs to process i % process_count; each process embeds its ranges' images on its
own devices, infers the attributes (`zeroshot.infer_attributes`) and writes one file per range,
`shards.shard_name(prefix, start, stop)`, atomically. So:

  * the files do not depend on the number of processes or devices: the cut does not, and every
    device embeds fixed batches of `batch_size` consecutive rows of a range, padded with zeros
    as the one-host path (`ZeroShotAnnotator.annotate`) pads its last batch (with `shard_size` a
    multiple of `batch_size` the batches are the one-host path's exactly);
  * a rerun resumes: a range whose file exists is skipped (a file exists only once whole), and
    the first run's settings, kept in `MANIFEST`, must match, so that a folder never mixes
    shards of two models or two cuts;
  * the shards are the text annotation shards' format (`shards.write_parquet_shard`), so
    `combine_shards` joins the text and the image side by row index with the rules of
    `combine.combine`, and M4 streams either folder (`balance.shards.as_shards`).

Entry point (docs/WEBSCALE.md, "Image annotation on a TPU slice"):

    python -m siglip_fair.annotate.multihost images --config configs/demo.py \
        --config.annotate.zeroshot.checkpoint=RUN_OR_RELEASED --workdir W [--distributed]
    python -m siglip_fair.annotate.multihost combine --text T --image I --rule text_first \
        --output O
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from siglip_fair.annotate import resume, zeroshot
from siglip_fair.annotate.combine import RULES, combine
from siglip_fair.balance import shards as shards_lib
from siglip_fair.io import atomic_write

MANIFEST = "image_annotation.json"  # not .npz/.parquet: never read as a shard
IMAGE_PREFIX = "image"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class LocalEmbedder:
  """Embeds images on this process's devices, `batch_size` rows per device per call.

  Rows [j * batch_size, (j + 1) * batch_size) of a range always form one device's batch, so a
  row's embedding does not depend on how many devices or processes there are. With one device
  the embedder is called as it is (any callable, on the default device: under
  `jax.distributed` the process's first); with several it must be a JAX function, run under
  `jax.shard_map` over a 1-D mesh of the devices with replicated params.
  """

  def __init__(self, embed_images: Callable, params, batch_size: int,
               devices: Sequence[Any] | None = None):
    devices = list(jax.local_devices() if devices is None else devices)
    self.batch_size, self.num_devices = int(batch_size), len(devices)
    if len(devices) == 1:
      self.fn, self.params = embed_images, params
      return
    from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P
    mesh = Mesh(np.array(devices), ("batch",))
    self.params = jax.device_put(params, NamedSharding(mesh, P()))
    self.sharding = NamedSharding(mesh, P("batch"))
    self.fn = jax.jit(jax.shard_map(embed_images, mesh=mesh, in_specs=(P(), P("batch")),
                                    out_specs=P("batch")))

  @property
  def step_rows(self) -> int:
    return self.batch_size * self.num_devices

  def __call__(self, images: np.ndarray):
    """float32 [<= step_rows, H, W, 3] -> [same, D], dispatched (fetch with np.asarray)."""
    k = len(images)
    x = np.concatenate([images, np.zeros((self.step_rows - k, *images.shape[1:]), images.dtype)])
    if self.num_devices > 1:
      x = jax.device_put(x, self.sharding)
    return self.fn(self.params, x), k


def _range_embeddings(embedder: LocalEmbedder, source, prepare: Callable, start: int,
                      stop: int) -> np.ndarray:
  """[stop - start, D] float32 embeddings of source[start:stop]['image']; host reads of the
  next step overlap the devices' work on this one."""
  out, pending = [], None
  for a in range(start, stop, embedder.step_rows):
    rows = list(range(a, min(a + embedder.step_rows, stop)))
    # One batched read where the source has it (ArrayRecord data sources: parallel reads).
    records = (source.__getitems__(rows) if hasattr(source, "__getitems__")
               else [source[i] for i in rows])
    images = np.stack([r["image"] for r in records])
    dispatched = embedder(np.asarray(prepare(images), np.float32))
    if pending is not None:
      out.append(np.asarray(pending[0], np.float32)[:pending[1]])
    pending = dispatched
  out.append(np.asarray(pending[0], np.float32)[:pending[1]])
  return np.concatenate(out)


def annotate_shards(annotator: zeroshot.ZeroShotAnnotator, params, source,
                    out_dir: str | os.PathLike, *, shard_size: int,
                    prefix: str = IMAGE_PREFIX, identity: Mapping[str, Any] | None = None,
                    process_index: int | None = None, process_count: int | None = None,
                    devices: Sequence[Any] | None = None, max_shards: int | None = None,
                    log: Callable[[str], None] = lambda s: print(s, flush=True)
                    ) -> dict[str, Any]:
  """Annotates this process's share of `source` into `out_dir` (see the module docstring).

  Args:
    annotator, params: the zero-shot annotator and its model's params (`load_annotator`).
    source: random-access records (`len`, `[i]['image']` uint8 [H, W, 3]) of the N rows.
    out_dir: folder of the shards and `MANIFEST`.
    shard_size: rows per shard (the cut; every process must use the same).
    prefix: shard file prefix.
    identity: what else names the annotation (e.g. the checkpoint) for the manifest.
    process_index, process_count: default jax's; given explicitly, processes that share no
      JAX job (separate machines) can each annotate their share (no barrier then).
    devices: this process's devices (default `jax.local_devices()`).
    max_shards: stop after writing this many shards (a time-boxed run; rerun to go on).

  Returns:
    {'rows', 'shards', 'written', 'skipped', 'seconds', 'rows_per_s', 'complete'} of this
    process ('complete': process 0 of a JAX job, or a lone process, checked that the shards
    cover [0, N) once; separate jobs check with `shards.check_coverage` when all are done).
  """
  joined = process_index is None and process_count is None
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} must lie in [0, process_count={count}).")
  n = len(source)
  ranges = resume.shard_ranges(n, shard_size)
  if "image" not in source[0]:
    raise ValueError(f"the source's records have no 'image' field; they have "
                     f"{sorted(source[0])}.")
  cfg = annotator.cfg.to_dict() if hasattr(annotator.cfg, "to_dict") else dict(annotator.cfg)
  cfg.pop("batch_size", None)  # changes no annotation
  settings = json.loads(json.dumps(dict(rows=n, shard_size=int(shard_size), prefix=prefix,
                                        zeroshot=cfg, **dict(identity or {})), default=str))
  out_dir = os.fspath(out_dir)
  manifest = os.path.join(out_dir, MANIFEST)
  # Every process checks before any writes, so a mismatch stops all of them alike.
  if not resume.check_settings(manifest, settings) and index == 0:
    atomic_write(manifest, json.dumps(settings, indent=1, sort_keys=True))
  mine = ranges[index::count]
  todo = [r for r in mine
          if not os.path.exists(os.path.join(out_dir, shards_lib.shard_name(prefix, *r)))]
  log(f"annotate images: process {index}/{count}: {len(mine)} of {len(ranges)} shards "
      f"({n} rows, {shard_size} per shard) are this process's; {len(mine) - len(todo)} done "
      f"before, {len(todo)} to write")
  skipped = len(mine) - len(todo)
  if max_shards is not None:
    todo = todo[:max(0, int(max_shards))]
  t0, rows, written = time.perf_counter(), 0, 0
  if todo:
    embedder = LocalEmbedder(annotator.embed_images, params, annotator.cfg.batch_size, devices)
    prompt_embs = annotator.prompt_embeddings(params)
    temperature = annotator.temperature_fn(params)
    t0 = time.perf_counter()  # the rates are of the images (compilation included)
    for start, stop in todo:
      t = time.perf_counter()
      emb = _range_embeddings(embedder, source, annotator.prepare, start, stop)
      ann = zeroshot.infer_attributes(emb, prompt_embs, temperature, annotator.cfg)
      shards_lib.write_parquet_shard(
          os.path.join(out_dir, shards_lib.shard_name(prefix, start, stop)), ann)
      rows, written = rows + stop - start, written + 1
      dt, total = time.perf_counter() - t, time.perf_counter() - t0
      log(f"annotate images: process {index}/{count}: rows [{start}, {stop}) in {dt:.2f} s "
          f"({(stop - start) / dt:.0f} rows/s); {written}/{len(todo)} written, "
          f"{rows / total:.0f} rows/s on {embedder.num_devices} device(s) so far")
  seconds = time.perf_counter() - t0
  summary = dict(rows=rows, shards=len(mine), written=written, skipped=skipped,
                 seconds=seconds, rows_per_s=rows / seconds if rows else 0.0, complete=False)
  if joined:
    _barrier("siglip_fair.annotate.multihost")
  # Without a joint barrier (separate jobs) the other processes may still be writing.
  if index == 0 and max_shards is None and (joined or count == 1):
    shards_lib.check_coverage(out_dir, n, prefix)  # gaps, overlaps, strays, row counts
    summary["complete"] = True
    log(f"annotate images: {len(ranges)} shards cover rows [0, {n}) in {out_dir}")
  return summary


class _Folder:
  """The shards of a folder as one array source over global rows: `read(start, stop)` reads
  across shard boundaries (one shard open at a time when read front to back)."""

  def __init__(self, directory: str, prefix: str, n: int | None):
    self.ranges = shards_lib.check_coverage(directory, n, prefix)
    self.n = self.ranges[-1][1] if self.ranges else 0
    self._open = (None, None)

  def _shard(self, path):
    if self._open[0] != path:
      self._open = (path, shards_lib.ParquetShard(path))
    return self._open[1]

  def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
    parts = [self._shard(path).read(max(start, a) - a, min(stop, b) - a)
             for a, b, path in self.ranges if a < stop and b > start]
    if not parts:
      return {}
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}


def load_shards(directory: str | os.PathLike, prefix: str = IMAGE_PREFIX,
                n: int | None = None) -> dict[str, np.ndarray]:
  """The annotation arrays (float32) of a shard folder, in memory, after `check_coverage`."""
  folder = _Folder(os.fspath(directory), prefix, n)
  return folder.read(0, folder.n)


def combine_shards(text_dir: str | os.PathLike, image_dir: str | os.PathLike, rule: str,
                   out_dir: str | os.PathLike, *, text_prefix: str = "annotations",
                   image_prefix: str = IMAGE_PREFIX, prefix: str = "annotations",
                   n: int | None = None) -> list[str]:
  """Joins text- and image-side shard folders by global row index with `combine(text, image,
  rule)`, one output shard per text shard (same rows, `shard_name(prefix, ...)`), atomically.

  Both folders must cover the same rows [0, N) exactly once (N = `n`, or the text side's);
  their cuts may differ (the image side is read across its shards). The text side's utility
  `u` (e.g. from a CLIP-score column) is kept; zeros without one. Returns the paths.
  """
  if rule not in RULES:
    raise ValueError(f"rule={rule!r}; expected one of {RULES}.")
  if os.path.abspath(os.fspath(out_dir)) in (os.path.abspath(os.fspath(text_dir)),
                                             os.path.abspath(os.fspath(image_dir))):
    raise ValueError(f"out_dir {os.fspath(out_dir)!r} must differ from the input folders "
                     "(M4 reads every shard of a folder).")
  text = _Folder(os.fspath(text_dir), text_prefix, n)
  image = _Folder(os.fspath(image_dir), image_prefix, None)
  if image.n != text.n:
    raise ValueError(f"the text shards in {os.fspath(text_dir)!r} cover rows [0, {text.n}) but "
                     f"the image shards in {os.fspath(image_dir)!r} cover [0, {image.n}); both "
                     "sides must annotate the same dataset.")
  paths = []
  for start, stop, _ in text.ranges:
    t, i = text.read(start, stop), image.read(start, stop)
    for side, name in ((t, "text"), (i, "image")):
      missing = [k for k in ("s", "known", "y", "w") if k not in side]
      if missing:
        raise ValueError(f"the {name} shards of rows [{start}, {stop}) lack {missing}.")
    ann = combine(t, i, rule)
    ann["u"] = t.get("u", np.zeros(stop - start, np.float32))
    paths.append(shards_lib.write_parquet_shard(
        os.path.join(os.fspath(out_dir), shards_lib.shard_name(prefix, start, stop)), ann))
  return paths


def _run_annotator(cfg, model_config, tokenizer):
  """`zeroshot.load_annotator` for a training run's workdir in a multi-process job."""
  from siglip_fair.evaluate.base import preprocess_images  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.two_tower import embed_fns, make_model, temperature  # pylint: disable=g-import-not-at-top
  from siglip_fair.train import checkpoint  # pylint: disable=g-import-not-at-top
  embed_images, embed_texts = embed_fns(make_model(model_config))
  return zeroshot.ZeroShotAnnotator(embed_images, embed_texts, tokenizer, temperature, cfg,
                                    prepare=preprocess_images), checkpoint.load_params(cfg.checkpoint)


def _source_and_annotator(config, workdir: str):
  """(source, annotator, params, identity) for `images`: the training split (world or
  `config.train_data`) and the checkpoint in `config.annotate.zeroshot`."""
  cfg = config.annotate.zeroshot
  if not cfg.get("checkpoint"):
    raise ValueError("--config.annotate.zeroshot.checkpoint is required: a trained two-tower "
                     "run's workdir, a big_vision .npz or a Hugging Face folder.")
  if zeroshot.is_released(cfg.checkpoint) and config.get("train_data"):
    # A released model brings its tokenizer and preprocessing: no world, no tokenizer to build.
    from siglip_fair.data import imports  # pylint: disable=g-import-not-at-top
    source, tokenizer = imports.data_source(config.train_data), None
  else:
    from siglip_fair import study  # pylint: disable=g-import-not-at-top
    data = study.prepare_data_in_turn(config, workdir)
    source, tokenizer = data.sources["train"], data.tokenizer
  if jax.process_count() > 1 and not zeroshot.is_released(cfg.checkpoint):
    annotator, params = _run_annotator(cfg, config.model, tokenizer)
  else:
    annotator, params = zeroshot.load_annotator(cfg, config.model, tokenizer)
  identity = dict(checkpoint=os.path.abspath(cfg.checkpoint),
                  train_data=config.get("train_data") or "world")
  if not zeroshot.is_released(cfg.checkpoint):  # a run that trains on changes its weights
    from siglip_fair.train import checkpoint  # pylint: disable=g-import-not-at-top
    identity["step"] = checkpoint.latest_step(cfg.checkpoint)
  return source, annotator, params, identity


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m siglip_fair.annotate.multihost",
      description="Zero-shot image annotation on one or many hosts into parquet shards by "
                  "global row range, and the join of text and image shards by row index.")
  sub = parser.add_subparsers(dest="command", required=True)
  images = sub.add_parser("images", help="annotate the training split's images",
                          epilog="Override any config field with --config.<key>=<value>.")
  images.add_argument("--config", default=None, help="FILE.py[:ARG] (default configs/demo.py)")
  images.add_argument("--workdir", required=True, help="the study's workdir (data, tokenizer)")
  images.add_argument("--output", default=None,
                      help="shard folder (default <workdir>/annotations_image)")
  images.add_argument("--shard_size", type=int, default=100_000,
                      help="rows per shard (the Beam text annotation's default too)")
  images.add_argument("--max_shards", type=int, default=None,
                      help="stop after writing this many shards per process (rerun to go on)")
  images.add_argument("--distributed", action="store_true",
                      help="join a multi-process JAX job, auto-detected (Cloud TPU, SLURM)")
  images.add_argument("--coordinator", default=None, help="process 0's HOST:PORT (manual)")
  images.add_argument("--num_processes", type=int, default=None)
  images.add_argument("--process_id", type=int, default=None)
  both = sub.add_parser("combine", help="join text and image shard folders by row index")
  both.add_argument("--text", required=True, help="text-side shard folder")
  both.add_argument("--image", required=True, help="image-side shard folder")
  both.add_argument("--rule", required=True, choices=[r for r in RULES])
  both.add_argument("--output", required=True, help="folder of the combined shards")
  both.add_argument("--text_prefix", default="annotations")
  both.add_argument("--image_prefix", default=IMAGE_PREFIX)
  both.add_argument("--prefix", default="annotations", help="prefix of the combined shards")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  from siglip_fair import config as cfglib  # pylint: disable=g-import-not-at-top
  from siglip_fair.config.loading import ConfigError, split_override_args  # pylint: disable=g-import-not-at-top
  try:
    overrides, rest = split_override_args(list(sys.argv[1:] if argv is None else argv))
  except ConfigError as e:
    print(f"annotate: config error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)
  try:
    if args.command == "combine":
      paths = combine_shards(args.text, args.image, args.rule, args.output,
                             text_prefix=args.text_prefix, image_prefix=args.image_prefix,
                             prefix=args.prefix)
      print(f"annotate combine: wrote {len(paths)} shards ({args.rule}) to {args.output}")
      return 0
    if args.distributed or args.coordinator is not None:
      from siglip_fair.train import distributed  # pylint: disable=g-import-not-at-top
      distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    spec = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs", "demo.py")
    config = cfglib.get_config(spec, overrides)
    source, annotator, params, identity = _source_and_annotator(config, args.workdir)
    out = args.output or os.path.join(args.workdir, "annotations_image")
    annotate_shards(annotator, params, source, out, shard_size=args.shard_size,
                    identity=identity, max_shards=args.max_shards)
  except ConfigError as e:
    print(f"annotate: config error: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:
    print(f"annotate {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
