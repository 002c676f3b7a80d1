"""The `results` subcommand: every finished run of a sweep in one table, by factor (SPEC §5).

A run is a folder with `config.json` (its `study` block names the factors: scale, model,
width, embed, examples, train_size, loss, data, switch, seed) and `eval.json` (final
metrics). `train_size` is config.json's world.sizes.train where it has one (what the run
trained on, whatever the study block says), else the study's value. The
`examples` factor is what the run actually saw, eval.json's final `step` × config.json's
`batch_size` (written "<n>ex"), not the study's nominal value: a run launched with
`--config.total=30 --config.batch_size=32` is 960ex, whatever `config.study` says; runs
whose nominal value differs are listed under the table. Only a run without a step or batch
size keeps the nominal value. Runs that differ only in the seed form one cell: mean ± std
over seeds. Each balanced cell is compared with the baseline cell of the same other factors
(examples seen included) by a paired Wilcoxon signed-rank test over the seeds they share
(exact, `findings.signed_rank_p`; with n seeds the smallest two-sided p is 2 / 2^n, e.g. 0.25
for 3, 0.031 for 6). RB and AB are in points (`summary.UNITS_NOTE`). The paper's findings
F1–F5 get an effect, a 95 % interval over seeds, a p and a verdict each (`findings`).

Writes results.csv (one row per cell and metric), results.md (the table, the tests and the
findings), results_findings.json and results.png (RB and AB by data version and switch point;
quality against model size when the sweep varies it), and prints one line per finding.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from siglip_fair.io import atomic_write
from siglip_fair.report import findings
from siglip_fair.report.summary import UNITS_NOTE

FACTORS = ("scale", "model", "width", "embed", "examples", "train_size", "loss", "data",
           "switch")
METRICS = ("bias/rb", "bias/ab_mean", "bias/ab_argmax_mean", "zeroshot/top1",
           "retrieval/i2t_r1", "retrieval/t2i_r1")


def examples_seen(config: dict, final: dict) -> int | None:
  """Examples a finished run saw: eval.json's `step` × config.json's `batch_size` (the
  global batch, as the training loop's `examples_seen`); None if either is missing."""
  step, batch = final.get("step"), config.get("batch_size")
  if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (step, batch)):
    return None
  return step * batch


def collect(root: str) -> tuple[list[dict], list[str]]:
  """(rows of finished runs, names of unfinished runs).

  A row holds the factors (`examples` = examples actually seen, see the module docstring),
  seed, metrics, 'run', 'examples_seen' (int or None), 'examples_config' (the study's
  nominal value), 'bias/ab_signed' (mean of the per-pair signed `bias/ab/<pair>` gaps, when
  eval.json has them) and 'rb_direction' / 'ab_direction' (`findings.data_directions`).
  """
  rows, unfinished = [], []
  for folder, dirs, files in os.walk(root):
    # Dot folders: runs set aside by the launcher (.stale/) and staging folders.
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and d not in ("checkpoints", "tensorboard", "data"))
    if "config.json" not in files:
      continue
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
    study = config.get("study")
    if not study:
      continue
    name = os.path.relpath(folder, root)
    if "eval.json" not in files:
      unfinished.append(name)
      continue
    with open(os.path.join(folder, "eval.json"), encoding="utf-8") as f:
      final = json.load(f)
    factors = {k: str(study.get(k, "")) for k in FACTORS}
    train = ((config.get("world") or {}).get("sizes") or {}).get("train")
    if isinstance(train, int) and not isinstance(train, bool) and not config.get("train_data"):
      factors["train_size"] = str(train)
    seen = examples_seen(config, final)
    nominal = factors["examples"]
    if seen is not None:
      factors["examples"] = f"{seen}ex"
    pairs = [float(v) for k, v in final.items() if k.startswith("bias/ab/")
             and not k.endswith(("_lo", "_hi"))]
    rb_dir, ab_dir = findings.data_directions(config)
    rows.append({**factors, "seed": int(study["seed"]), "run": name, "examples_seen": seen,
                 "examples_config": nominal, "rb_direction": rb_dir, "ab_direction": ab_dir,
                 **({"bias/ab_signed": float(np.mean(pairs))} if pairs else {}),
                 **{m: float(final[m]) for m in METRICS if m in final}})
  return rows, unfinished


def _cell_key(row) -> tuple:
  return tuple(row[k] for k in FACTORS)


def cells(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
  """One entry per factor combination: factors, n seeds, and per metric [mean, std (ddof=1)]."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(_cell_key(row), []).append(row)
  out = []
  for key, members in groups.items():
    cell = {**dict(zip(FACTORS, key)), "n": len(members),
            "seeds": sorted(r["seed"] for r in members)}
    for m in metrics:
      v = np.array([r[m] for r in members if m in r], np.float64)
      if v.size:
        cell[m] = [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0]
    out.append(cell)
  return out


def wilcoxon_vs_baseline(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
  """Per non-baseline cell and metric: mean paired difference to the matching baseline cell
  (same factors but data/switch), the number of shared seeds and the exact two-sided Wilcoxon
  signed-rank p (`findings.signed_rank_p`; 1 when every difference is 0)."""
  context = lambda r: tuple(r[k] for k in FACTORS if k not in ("data", "switch"))
  base = {(context(r), r["seed"]): r for r in rows if r["data"] == "baseline"}
  tests = []
  for cell_rows in _by_cell(rows):
    first = cell_rows[0]
    if first["data"] == "baseline":
      continue
    for m in metrics:
      pairs = [(r[m], base[(context(r), r["seed"])][m]) for r in cell_rows
               if (context(r), r["seed"]) in base and m in r]
      if not pairs:
        continue
      x, y = np.array(pairs).T
      d = x - y
      p = findings.signed_rank_p(d)
      tests.append({"data": first["data"], "switch": first["switch"],
                    **{k: first[k] for k in FACTORS if k not in ("data", "switch")},
                    "metric": m, "n": len(pairs), "mean_diff": float(d.mean()), "p": p})
  return tests


def _by_cell(rows):
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(_cell_key(row), []).append(row)
  return list(groups.values())


def _varying(table) -> list[str]:
  return [k for k in FACTORS if len({c[k] for c in table}) > 1]


def to_csv(table, tests, metrics=METRICS) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow([*FACTORS, "n", "metric", "mean", "std", "diff_vs_baseline", "wilcoxon_p"])
  index = {(tuple(t[k] for k in FACTORS), t["metric"]): t for t in tests}
  for c in table:
    for m in metrics:
      if m in c:
        t = index.get((tuple(c[k] for k in FACTORS), m))
        writer.writerow([*(c[k] for k in FACTORS), c["n"], m, c[m][0], c[m][1],
                         "" if t is None else t["mean_diff"], "" if t is None else t["p"]])
  return buffer.getvalue()


def to_markdown(table, tests, unfinished, metrics=METRICS, rows=()) -> str:
  """results.md; `rows` (from `collect`) adds the runs whose nominal examples differ from
  what they saw."""
  shown = _varying(table) or ["data"]
  lines = ["# Sweep results", "", f"{len(table)} cells; mean ± std over seeds. Columns that are "
           "the same in every cell are left out; `examples` is what each run saw (final step × "
           f"batch size). {UNITS_NOTE}", "",
           "| " + " | ".join([*shown, "n", *metrics]) + " |",
           "|" + "---|" * (len(shown) + 1 + len(metrics))]
  for c in sorted(table, key=lambda c: tuple(str(c[k]) for k in shown)):
    vals = [f"{c[m][0]:.3f} ± {c[m][1]:.3f}" if m in c else "n/a" for m in metrics]
    lines.append("| " + " | ".join([*(str(c[k]) for k in shown), str(c["n"]), *vals]) + " |")
  if tests:
    lines += ["", "## Balanced vs baseline (paired by seed, Wilcoxon signed-rank)", "",
              "| " + " | ".join([*shown, "metric", "n", "mean diff", "p"]) + " |",
              "|" + "---|" * (len(shown) + 4)]
    for t in tests:
      lines.append("| " + " | ".join([*(str(t[k]) for k in shown), t["metric"], str(t["n"]),
                                      f"{t['mean_diff']:+.3f}", f"{t['p']:.3g}"]) + " |")
  differ = sorted(f"{r['run']} ({r['examples_config'] or 'unset'} → {r['examples']})"
                  for r in rows if r["examples_config"] != r["examples"])
  if differ:
    lines += ["", "Runs whose config.study.examples differs from the examples they saw "
              f"(grouped by the latter): {', '.join(differ)}."]
  if unfinished:
    lines += ["", f"Unfinished runs (left out): {', '.join(sorted(unfinished))}."]
  return "\n".join(lines) + "\n"


def plot(table) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = sorted({c["model"] for c in table})
  panels = [("bias/rb", "RB"), ("bias/ab_mean", "AB (mean |gap|)")]
  quality = len(models) > 1
  fig, axes = plt.subplots(1, len(panels) + quality, figsize=(4.2 * (len(panels) + quality), 3.2),
                           squeeze=False)
  cellnames = sorted({(c["data"], c["switch"]) for c in table},
                     key=lambda ds: (ds[0] != "baseline", ds))
  for ax, (metric, title) in zip(axes[0], panels):
    for j, model in enumerate(models):
      ms = [next((c[metric] for c in table if (c["data"], c["switch"]) == ds
                  and c["model"] == model and metric in c), [math.nan, 0]) for ds in cellnames]
      width = 0.8 / len(models)
      ax.bar(np.arange(len(cellnames)) + (j - (len(models) - 1) / 2) * width,
             [m[0] for m in ms], width, yerr=[m[1] for m in ms], capsize=3, label=model)
    ax.set_xticks(range(len(cellnames)),
                  [d if d == "baseline" else f"{d}@{s}" for d, s in cellnames], rotation=30,
                  ha="right", fontsize=7)
    ax.set_title(title)
    ax.set_ylabel("points")
    ax.axhline(0, color="grey", lw=0.5)
  if quality:
    ax = axes[0][-1]
    for metric in ("zeroshot/top1", "retrieval/i2t_r1"):
      base = [next((c[metric] for c in table if c["model"] == m and c["data"] == "baseline"
                    and metric in c), [math.nan, 0]) for m in models]
      ax.errorbar(range(len(models)), [b[0] for b in base], [b[1] for b in base], marker="o",
                  capsize=3, label=metric)
    ax.set_xticks(range(len(models)), models)
    ax.set_title("quality vs model size (baseline)")
    ax.legend(fontsize=7)
  if len(models) > 1:
    axes[0][0].legend(fontsize=7)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return buffer.getvalue()


def write_results(root: str) -> list[str]:
  rows, unfinished = collect(root)
  if not rows:
    raise ValueError(f"no finished runs under {root!r}: a run needs config.json with a "
                     "`study` block (configs/study.py) and eval.json; "
                     f"{len(unfinished)} unfinished.")
  table, tests = cells(rows), wilcoxon_vs_baseline(rows)
  verdicts = findings.evaluate(rows, [k for k in FACTORS if k not in ("data", "switch")])
  for line in findings.summary_lines(verdicts):
    print(f"results: {line}")
  markdown = to_markdown(table, tests, unfinished, rows=rows)
  if verdicts:
    markdown += "\n" + findings.to_markdown(verdicts)
  return [atomic_write(os.path.join(root, "results.csv"), to_csv(table, tests)),
          atomic_write(os.path.join(root, "results.md"), markdown),
          atomic_write(os.path.join(root, "results_findings.json"),
                       json.dumps(findings.to_json(verdicts), indent=1, allow_nan=False)),
          atomic_write(os.path.join(root, "results.png"), plot(table))]
