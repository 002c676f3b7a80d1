"""Input-pipeline throughput: decode + preprocess images/s per core and per worker, and the
worker count a device step needs (`pipeline.workers_needed`).

    python benchmarks/input_bench.py [--world-train 4096] [--jpegs 512] [--seconds 6]
        [--workers 1,2] [--no-processes] [--no-flops] [--pipelines world_memory,jpeg_224]

Pipelines, each read exactly as the training loop reads it (`pipeline.train_dataset`: keep ->
shuffle -> caption choice + tokenize + uint8 -> float32 [-1, 1] -> batch), with the knob the
pipeline exposes, grain's `ReadOptions.num_threads` ("threads"), and grain's process workers
(`mp_prefetch`, "processes") on top:
  world_memory     the demo's synthetic world at 32 px as `study.prepare_data` serves it
                   (cache_train: decoded once into an `InMemorySource`), demo tokenizer (48 tokens);
  world_arrayrecord the same split read from its TFDS ArrayRecord files (cache_train=False);
  jpeg_224 / jpeg_32 a corpus of JPEGs of 256-512 px (smooth random scenes, random aspect
                   ratios) written as a webdataset tar and imported with `data/imports.py` at
                   224 and 32 px: each read decodes the stored JPEG.
The import itself (decode the 256-512 px originals, crop, resize, re-encode) is timed too, and
so is reading (decoding) each source alone, without the pipeline's preprocessing.

Figures per run: images/s (wall), images per CPU-second of every thread and worker process
(= images/s per fully used core, the figure that stays put when other jobs share the cores)
and wall images/s per worker. The rule's per-worker rate r is images per CPU-second: a worker
is one core's work. The worked example takes B/16's training FLOPs per example from XLA's cost
analysis of the step (lowered on the CPU, not run) and a step time derived from them at a quoted
MFU on an H100; it is derived, not measured. Last line: one JSON object.
"""
import argparse
import gc
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s (train/flops.py's table)


def _cpu_seconds(proc) -> float:
  """User + system CPU time of this process's threads and its live child processes."""
  total = sum(proc.cpu_times()[:2])
  for child in proc.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except Exception:  # pylint: disable=broad-except  # a worker that just exited
      pass
  return total


def measure(make_iter, batch, seconds, workers):
  """Reads batches for ~`seconds` after two warm-up batches; returns the rates."""
  import psutil  # pylint: disable=g-import-not-at-top
  proc = psutil.Process()
  it = make_iter()
  for _ in range(2):
    next(it)
  wall0, cpu0, n = time.perf_counter(), _cpu_seconds(proc), 0
  while True:
    x = next(it)
    n += x["image"].shape[0]
    wall = time.perf_counter() - wall0
    if wall >= seconds and n >= 4 * batch:
      break
  cpu = _cpu_seconds(proc) - cpu0  # read before closing: workers' times die with them
  if hasattr(it, "close"):
    it.close()
  del it  # its prefetch threads must not add CPU time to the next run
  gc.collect()
  assert x["image"].dtype == np.float32 and x["image"].shape[0] == batch
  return dict(images=n, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
              images_per_s=round(n / wall, 1), images_per_cpu_s=round(n / max(cpu, 1e-9), 1),
              images_per_s_per_worker=round(n / wall / workers, 1))


def decode_rate(source, count, seed=0):
  """Records read (and, for JPEG sources, decoded) per CPU-second, in random order in the
  calling thread, without the pipeline's preprocessing: the decode part of the per-core rate."""
  idx = np.random.default_rng(seed).permutation(len(source))[:count].tolist()
  getitems = getattr(source, "__getitems__", None)
  read = (lambda keys: getitems(keys)) if getitems else (lambda keys: [source[i] for i in keys])
  read(idx[:8])  # opens the files
  cpu0 = time.process_time()
  for start in range(0, len(idx), 64):
    read(idx[start:start + 64])
  return round(len(idx) / max(time.process_time() - cpu0, 1e-9), 1)


def write_jpeg_shard(path, count, seed):
  """A webdataset tar of `count` JPEGs (256-512 px per side, quality 90) with captions."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
  things = ["circle", "square", "stripe", "cloud", "field", "house", "tree", "car"]
  with tarfile.open(path, "w") as tar:
    for i in range(count):
      h, w = (int(v) for v in rng.integers(256, 513, size=2))
      # Smooth colour fields plus fine noise: JPEGs of a realistic size, not flat ones.
      coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
      image = np.asarray(PIL.Image.fromarray(coarse).resize((w, h), PIL.Image.BICUBIC))
      image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
      out = io.BytesIO()
      PIL.Image.fromarray(image).save(out, format="JPEG", quality=90)
      caption = (f"a photo of a {rng.choice(colours)} {rng.choice(things)} next to a "
                 f"{rng.choice(colours)} {rng.choice(things)}").encode()
      for ext, data in (("jpg", out.getvalue()), ("txt", caption)):
        info = tarfile.TarInfo(f"{i:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def b16_flops_per_example(batches=(2, 4)):
  """Training FLOPs per example of B/16 at 224 px (text 64 tokens): XLA's cost analysis of
  the lowered step at two batch sizes, differenced (fixed per-step costs cancel)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  from train_bench import B_INIT, CASES, OPTIM, T_INIT  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.two_tower import make_model  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.sharding import (DEFAULT_RULES, batch_sharding,  # pylint: disable=g-import-not-at-top
                                          make_mesh, state_shardings)
  from siglip_fair.train.state import make_init_fn, make_train_step  # pylint: disable=g-import-not-at-top
  case = CASES["B/16"]
  tower = lambda s, **kw: dict(variant=s[0], width=s[1], depth=s[2], mlp_dim=s[3],  # noqa: E731
                               num_heads=s[4], **kw)
  model = make_model(ConfigDict(dict(
      image=tower(case["img"], pool="tok", posemb="learn"),
      text=tower(case["txt"], vocab_size=case["vocab"], max_len=case["text_len"], pool="last"),
      embed_dim=case["embed"], t_init=T_INIT, b_init=B_INIT)))
  tx, schedule = make_optimizer(ConfigDict(OPTIM), total_steps=10_000, warmup_steps=100)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  flops = []
  for b in batches:
    image = jax.ShapeDtypeStruct((b, case["image_size"], case["image_size"], 3), np.float32)
    text = jax.ShapeDtypeStruct((b, case["text_len"]), np.int32)
    init = make_init_fn(model, tx, np.zeros(image.shape, np.float32),
                        np.ones(text.shape, np.int32))
    abstract = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
    shardings = state_shardings(abstract, mesh, DEFAULT_RULES)
    step = make_train_step(model, tx, "sigmoid", schedule=schedule, state_sharding=shardings,
                           batch_sharding=batch_sharding(mesh))
    cost = step.lower(abstract, {"image": image, "text": text}).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops.append(float(cost["flops"]))
  return (flops[1] - flops[0]) / (batches[1] - batches[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--world-train", type=int, default=4096, help="world train split size")
  parser.add_argument("--jpegs", type=int, default=512, help="JPEGs in the imported corpus")
  parser.add_argument("--seconds", type=float, default=6.0, help="timed reading per run")
  parser.add_argument("--workers", default="1,2", help="thread / process counts to measure")
  parser.add_argument("--no-processes", action="store_true", help="threads only")
  parser.add_argument("--pipelines", default="world_memory,world_arrayrecord,jpeg_224,jpeg_32")
  parser.add_argument("--no-flops", action="store_true", help="skip B/16's FLOP count")
  parser.add_argument("--mfu", type=float, default=0.45, help="MFU of the worked example")
  parser.add_argument("--batch", type=int, default=1024, help="batch of the worked example")
  args = parser.parse_args()

  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain's process workers read absl flags (defaults suffice)
  from siglip_fair import study  # pylint: disable=g-import-not-at-top
  from siglip_fair.data import builder, imports, pipeline  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix="input_bench_")
  config = demo.get_config()
  config.world.sizes = dict(train=args.world_train, objects=16, people=16, retrieval=16)
  start = time.perf_counter()
  data = study.prepare_data(config, tmp)  # builds the world and the tokenizer, caches train
  print(f"world ({args.world_train} train records, {config.world.image_size} px) and tokenizer "
        f"in {time.perf_counter() - start:.1f} s", flush=True)

  shard = os.path.join(tmp, "corpus-000000.tar")
  start = time.perf_counter()
  write_jpeg_shard(shard, args.jpegs, seed=0)
  print(f"{args.jpegs} JPEGs (256-512 px) written in {time.perf_counter() - start:.1f} s, "
        f"{os.path.getsize(shard) / args.jpegs / 1024:.0f} KiB each", flush=True)
  import psutil  # pylint: disable=g-import-not-at-top
  sources, conversion = {
      "world_memory": data.sources["train"],
      "world_arrayrecord": builder.data_source(config.world, data.data_dir, "train")}, {}
  for size in (224, 32):
    wall0 = time.perf_counter()
    cpu0 = sum(psutil.Process().cpu_times()[:4])  # self + waited-for children (the pool)
    path = imports.import_pairs("webdataset", [shard], os.path.join(tmp, "imports"),
                                name=f"bench_{size}", image_size=size, num_workers=2)
    wall = time.perf_counter() - wall0
    cpu = sum(psutil.Process().cpu_times()[:4]) - cpu0
    conversion[f"jpeg_{size}"] = dict(images=args.jpegs, processes=2, wall_s=round(wall, 2),
                                      images_per_s=round(args.jpegs / wall, 1),
                                      images_per_cpu_s=round(args.jpegs / cpu, 1))
    print(f"import at {size} px: {conversion[f'jpeg_{size}']}", flush=True)
    sources[f"jpeg_{size}"] = imports.data_source(path)

  runs = []
  counts = [int(w) for w in args.workers.split(",")]
  kinds = ("threads",) if args.no_processes else ("threads", "processes")
  wanted, decodes = args.pipelines.split(","), {}
  for name, source in sources.items():
    if name not in wanted:
      continue
    px = source[0]["image"].shape[0]
    decode = decode_rate(source, min(len(source), 2048))
    print(f"{name}: read + decode {decode} records per CPU-second", flush=True)
    decodes[name] = decode
    batch = 64 if px >= 128 else 128  # the demo's batch at 32 px; B/16-sized images: 64
    for kind in kinds:
      for k in counts:
        def make_iter(k=k, kind=kind, source=source, batch=batch):
          threads = k if kind == "threads" else 1
          ds = pipeline.train_dataset(
              source, tokenizer=data.tokenizer, global_batch_size=batch, seed=0,
              read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch))
          if kind == "processes":
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=k))
          return iter(ds)
        try:
          row = measure(make_iter, batch, args.seconds, k)
        except Exception as e:  # pylint: disable=broad-except  # e.g. a source that won't pickle
          row = dict(error=f"{type(e).__name__}: {e}"[:300])
        row = dict(pipeline=name, image_px=int(px), batch=batch, kind=kind, workers=k, **row)
        runs.append(row)
        print(json.dumps(row), flush=True)

  def single(name):  # one worker thread: the per-core rate the rule uses
    row = next(r for r in runs if r["pipeline"] == name and r["kind"] == "threads"
               and r["workers"] == 1 and "error" not in r)
    return row["images_per_cpu_s"]

  rates = {name: single(name) for name in sources if name in wanted}
  example = None
  if not args.no_flops:
    start = time.perf_counter()
    per_example = b16_flops_per_example()
    step_s = args.batch * per_example / (args.mfu * H100_BF16_PEAK)
    r = rates.get("jpeg_224") or max(rates.values())
    example = dict(
        model="B/16 224 px, text 64 tokens", batch=args.batch,
        train_flops_per_example=per_example, flops_source="XLA cost analysis of the lowered "
        "fp32 step on the CPU (same FLOPs in bf16)", device="H100 (989 TFLOP/s bf16 dense)",
        mfu=args.mfu, step_time_s_derived=round(step_s, 4),
        images_per_s_needed=round(args.batch / step_s, 1), per_worker_rate=r,
        workers_needed=pipeline.workers_needed(args.batch, step_s, r),
        workers_needed_no_headroom=pipeline.workers_needed(args.batch, step_s, r, 1.0))
    print(f"worked example ({time.perf_counter() - start:.1f} s): {example}", flush=True)
  print(json.dumps(dict(
      cpu_count=os.cpu_count(), load_avg=[round(v, 2) for v in os.getloadavg()],
      grain=grain.__version__, per_core_images_per_s=rates,
      decode_only_per_cpu_s=decodes, import_conversion=conversion,
      runs=runs, worked_example=example,
      rule="workers = ceil(headroom * batch / (step_time_s * per_worker_images_per_s)), "
           "headroom 1.2 (pipeline.workers_needed)")))


if __name__ == "__main__":
  main()
