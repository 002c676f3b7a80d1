"""Rows/s per worker of the Beam import and text annotation on this machine (DirectRunner).

    python benchmarks/beam_bench.py [--pairs 1200] [--caption_rows 24000]

Writes a synthetic webdataset corpus (`--pairs` pairs of `--source_px` px JPEGs in `--tars`
tars, one caption each, converted to `--image_size`), then measures:
  import    the whole Beam import (data/beam_import.py) with 1 worker (in_memory) and 2 worker
            processes (multi_processing), each from an empty staging folder; the single-process
            import (imports.import_pairs, 1 conversion worker) for reference; and the
            conversion of one tar in this process without Beam or TFDS (conversion alone);
  annotate  the Beam text annotation (annotate/beam_annotate.py) of a `--caption_rows`-row
            dataset (8 px images) with 1 and 2 workers, and one shard annotated in this process.
Per-worker rows/s = rows / wall seconds / workers. Beam's start-up (seconds; worker processes
start their own SDK harness) is inside the pipeline walls, so on a small corpus the in-process
rates are the better per-worker figure for a large run; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("a man woman doctor nurse librarian with his her book laptop broom in the park at "
         "work reading scientist microscope office").split()
ONE = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
TWO = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _image(rng, px) -> bytes:
  # Smooth gradients plus a little noise: JPEG sizes like photos', not like white noise's.
  y, x = np.mgrid[0:px, 0:px] / px
  base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 255, 3)
  pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_tars(root, pairs, tars, px, seed=0) -> list[str]:
  rng = np.random.default_rng(seed)
  images = [_image(rng, px) for _ in range(16)]  # reused: writing is not what is measured
  paths, per = [], -(-pairs // tars)
  for t in range(tars):
    path = os.path.join(root, f"{t:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(t * per, min(pairs, (t + 1) * per)):
        caption = " ".join(rng.choice(WORDS, size=8)).encode()
        for ext, data in (("jpg", images[i % len(images)]), ("txt", caption)):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", type=int, default=1200)
  p.add_argument("--tars", type=int, default=6)
  p.add_argument("--source_px", type=int, default=384)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--caption_rows", type=int, default=24000)
  p.add_argument("--shard_size", type=int, default=3000)
  args = p.parse_args(argv)
  from siglip_fair.annotate import beam_annotate
  from siglip_fair.data import beam_import, imports
  root = tempfile.mkdtemp(prefix="beam_bench.")
  out = {"machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
         "import": {"pairs": args.pairs, "tars": args.tars, "source_px": args.source_px,
                    "image_size": args.image_size}, "annotate": {"rows": args.caption_rows}}
  try:
    tars = write_tars(root, args.pairs, args.tars, args.source_px)
    print(f"corpus: {args.pairs} pairs in {args.tars} tars", flush=True)
    _, sec = _timed(lambda: beam_import.convert_unit("webdataset", tars[0], args.image_size))
    rows0 = -(-args.pairs // args.tars)
    out["import"]["in_process_rows_per_s"] = round(rows0 / sec, 1)
    print(f"import, one tar in this process: {rows0 / sec:.1f} rows/s", flush=True)
    _, sec = _timed(lambda: imports.import_pairs(
        "webdataset", tars, os.path.join(root, "tfds0"), name="bench",
        image_size=args.image_size, num_workers=1))
    out["import"]["single_process_import_rows_per_s"] = round(args.pairs / sec, 1)
    print(f"import, imports.import_pairs with 1 worker: {args.pairs / sec:.1f} rows/s", flush=True)
    for workers, opts in ((1, ONE), (2, TWO)):
      data_dir = os.path.join(root, f"tfds{workers}")
      _, sec = _timed(lambda data_dir=data_dir, opts=opts: beam_import.beam_import(
          "webdataset", tars, data_dir, name="bench", image_size=args.image_size,
          beam_args=opts))
      out["import"][f"workers_{workers}"] = {
          "wall_s": round(sec, 2), "rows_per_s": round(args.pairs / sec, 1),
          "rows_per_s_per_worker": round(args.pairs / sec / workers, 1)}
      print(f"import, Beam, {workers} worker(s): {sec:.1f} s, "
            f"{args.pairs / sec / workers:.1f} rows/s per worker", flush=True)

    os.makedirs(os.path.join(root, "small"))
    os.makedirs(os.path.join(root, "probe"))
    small = write_tars(os.path.join(root, "small"), args.caption_rows, 8, 16, seed=1)
    dataset = beam_import.beam_import("webdataset", small, os.path.join(root, "tfds_c"),
                                      name="captions", image_size=8, beam_args=ONE)
    _, sec = _timed(lambda: beam_annotate.annotate_range(
        (0, args.shard_size), dataset=dataset, out_dir=os.path.join(root, "probe"),
        prefix="annotations", lexicon=beam_annotate.lexicon_lib.default_lexicon_config(),
        caption_index=0, utility=None))
    out["annotate"]["in_process_rows_per_s"] = round(args.shard_size / sec, 1)
    print(f"annotate, one shard in this process: {args.shard_size / sec:.0f} rows/s", flush=True)
    for workers, opts in ((1, ONE), (2, TWO)):
      _, sec = _timed(lambda workers=workers, opts=opts: beam_annotate.annotate_text(
          dataset, os.path.join(root, f"ann{workers}"), shard_size=args.shard_size,
          beam_args=opts))
      out["annotate"][f"workers_{workers}"] = {
          "wall_s": round(sec, 2), "rows_per_s": round(args.caption_rows / sec, 1),
          "rows_per_s_per_worker": round(args.caption_rows / sec / workers, 1)}
      print(f"annotate, Beam, {workers} worker(s): {sec:.1f} s, "
            f"{args.caption_rows / sec / workers:.0f} rows/s per worker", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  # 10^8 pairs on 100 workers at the 1-worker Beam rate (start-up and writing included, so
  # on a corpus this small an upper bound) and at the in-process rate (conversion alone).
  for basis, field in (("beam_1_worker", None), ("in_process", "in_process_rows_per_s")):
    out[f"hours_for_1e8_on_100_workers_{basis}"] = {
        k: round(1e8 / ((out[k][field] if field else out[k]["workers_1"]["rows_per_s"]) * 100)
                 / 3600, 2) for k in ("import", "annotate")}
  out["machine"]["load_1min_end"] = os.getloadavg()[0]
  return out


if __name__ == "__main__":
  print(json.dumps(main()))
