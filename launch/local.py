"""Runs a config file's sweep locally, one run after another, each in its own workdir.

    python launch/local.py --config configs/siglip.py:steps=300 --workdir workdir/sweep

`sweep(add)` in the config file calls `add(**args)` once per run; the args are merged into the
``get_config`` argument string after the colon. A run whose workdir already has `eval.json` is
skipped and an unfinished one resumes from its checkpoints, so the launcher can be killed and
restarted. Overrides (``--config.x=y``) apply to every run.
"""
from __future__ import annotations

import argparse
import os
import sys


def run_names(module, base_arg: str) -> list[tuple[str, str]]:
  """[(run name, get_config argument string)] for every `add(**args)` of the sweep."""
  if not hasattr(module, "sweep"):
    raise ValueError(f"{module.__file__} defines no sweep(add).")
  runs = []

  def add(**args):
    extra = ",".join(f"{k}={v}" for k, v in sorted(args.items()))
    name = "_".join(f"{k}={v}" for k, v in sorted(args.items())).replace("/", "-") or "run"
    runs.append((name, ",".join(filter(None, [base_arg, extra]))))

  module.sweep(add)
  return runs


def main(argv=None) -> int:
  from siglip_fair import config as cfglib
  from siglip_fair import study
  overrides, rest = cfglib.split_override_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:ARGS] with a sweep(add).")
  parser.add_argument("--workdir", required=True, help="one sub-folder per run is made here.")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-host JAX job first (auto-detected, e.g. a TPU pod "
                           "slice where every host runs this same command).")
  args = parser.parse_args(rest)
  if args.distributed:
    from siglip_fair.train import distributed
    distributed.initialize()
  path, _, base_arg = args.config.partition(":")
  _, module = cfglib.load_config_file(path)
  runs = run_names(module, base_arg)
  for i, (name, arg) in enumerate(runs, 1):
    workdir = os.path.join(args.workdir, name)
    if os.path.exists(os.path.join(workdir, "eval.json")):
      print(f"[{i}/{len(runs)}] {name}: done, skipped")
      continue
    print(f"[{i}/{len(runs)}] {name}")
    config = cfglib.get_config(f"{path}:{arg}", overrides)
    config.data_dir = config.data_dir or os.path.join(args.workdir, "data")
    config.balance_dir = config.balance_dir or os.path.join(args.workdir, "balance")
    study.train_and_evaluate(config, workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
