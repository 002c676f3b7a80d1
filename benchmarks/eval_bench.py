"""Zero-shot evaluation of 50k images x 1k classes with a tiny model: peak memory and time of
the chunked evaluator, against the same evaluator scoring all images at once.

    python benchmarks/eval_bench.py [--images 50000] [--classes 1000] [--chunk 4096]

Each variant runs in its own process (`--worker CHUNK`) so its peak RSS is its own. Images are
generated per index on demand (never all in memory), so the figures are the evaluator's: the
[N, D] embeddings plus one [chunk, C] score block. The last line is one JSON object.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LazyImages:
  """Random 32 px images made from their index on each read, with a label per image."""

  def __init__(self, n, classes):
    self.n, self.classes = n, classes

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "label": np.int64(i % self.classes)}


class HashTokenizer:
  """Word -> id by hash, enough to give 1k distinct class prompts."""

  def encode(self, texts):
    import numpy as np  # pylint: disable=g-import-not-at-top
    out = np.zeros((len(texts), 16), np.int32)
    for row, text in zip(out, texts):
      ids = [1 + hash(w) % 319 for w in str(text).split()][:16]
      row[:len(ids)] = ids
    return out


def worker(args):
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from siglip_fair.evaluate import evaluators as ev  # pylint: disable=g-import-not-at-top
  from siglip_fair.models import embed_fns, make_model  # pylint: disable=g-import-not-at-top
  os.environ["PYTHONHASHSEED"] = "0"
  model = make_model(ml_collections.ConfigDict(dict(
      image=dict(variant="mu/8", width=64, depth=2), text=dict(variant="mu", vocab_size=320,
                                                              max_len=16), embed_dim=64)))
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                      np.ones((1, 16), np.int32))["params"]
  embed_images, embed_texts = embed_fns(model)
  context = ev.EvalContext(embed_images=embed_images, embed_texts=embed_texts,
                           tokenizer=HashTokenizer(),
                           sources={"val": LazyImages(args.images, args.classes)},
                           batch_size=500)
  evaluator = ev.ZeroShot(dict(split="val", label_key="label", templates=["a photo of {}."],
                               classes=[f"class{i}" for i in range(args.classes)],
                               chunk_size=args.worker, bootstrap=dict(num_samples=0)), context)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  result = dict(evaluator.run(params))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(chunk=args.worker, seconds=seconds, peak_rss_mib=peak,
                        rss_growth_mib=peak - base, top1=result["zeroshot/top1"],
                        images_per_sec=args.images / seconds)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=50_000)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--chunk", type=int, default=4096)
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  rows = []
  for chunk in (args.chunk, args.images):  # chunked, then everything in one block
    out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--classes",
                          str(args.classes), "--worker", str(chunk)], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  chunked, whole = rows
  print(json.dumps(dict(
      images=args.images, classes=args.classes, rows=rows,
      score_matrix_mib=args.images * args.classes * 4 / 2**20,
      score_block_mib=args.chunk * args.classes * 4 / 2**20,
      rss_growth_ratio=chunked["rss_growth_mib"] / whole["rss_growth_mib"],
      same_top1=chunked["top1"] == whole["top1"])))


if __name__ == "__main__":
  main()
