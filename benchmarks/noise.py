"""Noise first: how much of each study metric is evaluation-sample, training-step and seed noise.

    python benchmarks/noise.py --workdir w/noise [--seeds 3] [--config configs/study.py]
        [--config.eval_every=10%] [--config.world.object_scenes=composed ...]

Trains `--seeds` baseline runs that differ only in their seed (finished runs are reused: the
stages are content-addressed), then decomposes each metric's variance with
`siglip_fair.report.noise.decompose` and prints signal-to-noise per component. The last line is
one JSON object: {metric: {mean, seed_var, step_var, eval_var, total_sd, snr_*, max_jump_rel}}.
Run it before and after a change of the world or of the bias readings (docs/NOISE.md).

    python benchmarks/noise.py --runs 'w/study/data=baseline_seed=*'

decomposes runs that are already trained instead (each folder's metrics.jsonl and eval.json),
e.g. the baseline seeds of a sweep, without training anything.
"""
import argparse
import glob
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("bias/rb", "bias/rb_smooth", "bias/ab_mean", "bias/ab_argmax_mean", "zeroshot/top1",
           "retrieval/i2t_r1", "retrieval/t2i_r1")


def main(argv=None) -> int:
  sys.path.insert(0, REPO)
  from siglip_fair import config as cfglib, study  # pylint: disable=g-import-not-at-top
  from siglip_fair.report import noise  # pylint: disable=g-import-not-at-top
  from siglip_fair.report.plots import read_jsonl  # pylint: disable=g-import-not-at-top
  overrides, rest = cfglib.split_override_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="where the --seeds runs are trained")
  parser.add_argument("--runs", nargs="+", default=(),
                      help="trained run folders (glob patterns) to decompose instead")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "study.py"))
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args(rest)
  if args.runs:
    runs = sorted({r for pattern in args.runs for r in glob.glob(pattern)})
    if len(runs) < 2:
      parser.error(f"--runs {' '.join(args.runs)}: matched {len(runs)} run folder(s); the seed "
                   "component needs at least 2.")
    records, finals = [], []
    for run in runs:
      if not os.path.exists(os.path.join(run, "eval.json")):
        parser.error(f"--runs: {run} has no eval.json (not a finished run).")
      records.append(read_jsonl(os.path.join(run, "metrics.jsonl")))
      with open(os.path.join(run, "eval.json")) as f:
        finals.append(json.load(f))
    return _report(noise, records, finals)
  if not args.workdir:
    parser.error("give --workdir (train --seeds runs there) or --runs (decompose trained runs).")
  if args.seeds < 2:
    parser.error(f"--seeds {args.seeds}: the seed component needs at least 2 seeds.")
  overrides = [("eval_every", "10%"), *overrides]
  data_dir = os.path.join(args.workdir, "data")
  records, finals = [], []
  for seed in range(args.seeds):
    path, _, arg = args.config.partition(":")
    config = cfglib.get_config(f"{path}:{','.join(filter(None, [arg, f'seed={seed}']))}",
                               overrides)
    config.data_dir = data_dir
    run = os.path.join(args.workdir, f"seed={seed}")
    start = time.perf_counter()
    finals.append(study.train_and_evaluate(config, run))
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    records.append(read_jsonl(os.path.join(run, "metrics.jsonl")))
  return _report(noise, records, finals)


def _report(noise, records, finals) -> int:
  """Prints the decomposition per metric, then one JSON line."""
  out = {}
  for metric in METRICS:
    if all(metric in f for f in finals):
      out[metric] = noise.from_runs(records, finals, metric)
  print(f"\n{'metric':22s} {'mean':>8s} {'sd seed':>8s} {'sd step':>8s} {'sd eval':>8s} "
        f"{'SNR':>6s} {'jump/|final|':>12s}")
  for metric, d in out.items():
    print(f"{metric:22s} {d['mean']:8.3f} {d['seed_var'] ** 0.5:8.3f} "
          f"{d['step_var'] ** 0.5:8.3f} {d['eval_var'] ** 0.5:8.3f} {d['snr_total']:6.2f} "
          f"{d['max_jump_rel']:12.2f}")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
