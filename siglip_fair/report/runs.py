"""The `report` subcommand: bias and quality over training for one or many runs.

A run is a workdir holding `metrics.jsonl` (curves logged during training, with the
evaluators' results every `eval_every` steps) and, once finished, `eval.json` (final metrics
with bootstrap intervals). The report plots RB, AB (points) and quality against examples seen,
one line per run, and tabulates each run's final metrics.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from siglip_fair.io import atomic_write
from siglip_fair.report.plots import plot_training_curves, read_jsonl
from siglip_fair.report.summary import UNITS_NOTE, format_table

REPORT_CURVES = ("bias/rb", "bias/ab_mean", "bias/ab_argmax_mean", "zeroshot/top1",
                 "retrieval/i2t_r1", "retrieval/t2i_r1", "loss")


def find_runs(root: str) -> dict[str, str]:
  """{run name: folder} for `root` itself or each folder below it (any depth) that holds a
  metrics.jsonl; names are paths relative to `root`."""
  runs = {}
  for folder, dirs, files in os.walk(root):
    # Dot folders: runs set aside by the launcher (.stale/) and staging folders.
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("checkpoints", "tensorboard"))
    if "metrics.jsonl" in files:
      runs[os.path.relpath(folder, root)] = folder
  return runs


def final_metrics(run_dir: str) -> dict:
  """eval.json of a finished run; else the last record of metrics.jsonl that has evaluator
  results (an unfinished run), marked with its step."""
  path = os.path.join(run_dir, "eval.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  evals = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
           if any(k.startswith(("bias/", "zeroshot/", "retrieval/")) for k in r)]
  if not evals:
    return {}
  return {k: v for k, v in evals[-1].items()
          if k.startswith(("bias/", "zeroshot/", "retrieval/")) or k == "step"}


def write_report(runs: Mapping[str, str], out_dir: str, *,
                 curves: Sequence[str] = REPORT_CURVES) -> tuple[str, str]:
  """Writes `out_dir/report.png` (curves vs examples seen) and `out_dir/report.md` (final
  metrics, one column per run). Returns both paths."""
  if not runs:
    raise ValueError(f"no runs to report: no metrics.jsonl under {out_dir!r} (or the folders "
                     "given); train first, or pass run folders with --runs.")
  for name, folder in runs.items():
    if not os.path.exists(os.path.join(folder, "metrics.jsonl")):
      raise FileNotFoundError(f"run {name!r}: {folder!r} has no metrics.jsonl.")
  logged = {k for folder in runs.values()
            for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) for k in r}
  present = [c for c in curves if c in logged]
  if not present:
    raise ValueError(f"the runs log none of {list(curves)}; they log {sorted(logged)}.")
  png = plot_training_curves({n: os.path.join(f, "metrics.jsonl") for n, f in runs.items()},
                             os.path.join(out_dir, "report.png"), metrics=present,
                             x="examples_seen")
  rows = [{"model": name, **final_metrics(folder)} for name, folder in runs.items()]
  md = atomic_write(os.path.join(out_dir, "report.md"),
                    "# Report\n\nFinal metrics (`value [lo, hi]` with bootstrap intervals); "
                    f"curves against examples seen in report.png. {UNITS_NOTE}\n\n"
                    + format_table(rows))
  return png, md
