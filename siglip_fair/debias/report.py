"""Tables and plots of the CLIP-debias comparison and sensitivity analyses."""
from __future__ import annotations

import io
import json
import math
import os

from siglip_fair.io import atomic_write

COLUMNS = (("accuracy", "accuracy"), ("worst_group_accuracy", "worst group"),
           ("accuracy_gap", "gap"), ("demographic_parity_difference", "DP diff"),
           ("equalized_odds_difference", "EO diff"),
           ("worst_pseudo_group_accuracy", "worst pseudo group"))


def _pm(cell) -> str:
  if cell is None or math.isnan(cell[0]):
    return "n/a"
  return f"{100 * cell[0]:.1f} ± {100 * cell[1]:.1f}"


def results_markdown(results: dict) -> str:
  summary = results["summary"]
  cols = [(k, name) for k, name in COLUMNS if any(k in m for m in summary.values())]
  lines = [f"# CLIP-debias on {results['task']}", "",
           f"Mean ± std over seeds {results['seeds']} (test split, percent).", "",
           "| method | " + " | ".join(name for _, name in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for method, row in summary.items():
    lines.append(f"| {method} | " + " | ".join(_pm(row.get(k)) for k, _ in cols) + " |")
  q = results.get("pseudo_groups") or {}
  if q:
    lines += ["", "Pseudo groups vs the true sensitive attribute (training split): " +
              ", ".join(f"{k} {v:.3f}" for k, v in q.items() if k != "inertia") + "."]
  share = results.get("oracle_gain_share")
  if share is not None and not math.isnan(share):
    lines.append(f"CLIP-debias recovers {100 * share:.0f} % of the best oracle's worst-group "
                 "gain over ERM.")
  return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  return buffer.getvalue()


def results_plot(results: dict) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = results["summary"]
  methods = list(summary)
  fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.2))
  width = 0.4
  for j, (key, name) in enumerate((("accuracy", "accuracy"),
                                   ("worst_group_accuracy", "worst-group accuracy"))):
    means = [100 * summary[m].get(key, [math.nan, 0])[0] for m in methods]
    stds = [100 * summary[m].get(key, [0, 0])[1] for m in methods]
    ax.bar([i + (j - 0.5) * width for i in range(len(methods))], means, width, yerr=stds,
           capsize=3, label=name)
  ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
  ax.set_ylabel("test %")
  ax.set_title(f"CLIP-debias on {results['task']} (mean ± std over {len(results['seeds'])} seeds)")
  ax.legend(loc="lower right")
  data = _png(fig)
  plt.close(fig)
  return data


def write_results(results: dict, workdir: str) -> list[str]:
  return [atomic_write(os.path.join(workdir, "results.json"), json.dumps(results, indent=1)),
          atomic_write(os.path.join(workdir, "results.md"), results_markdown(results)),
          atomic_write(os.path.join(workdir, "results.png"), results_plot(results))]


def sensitivity_markdown(table: dict) -> str:
  lines = [f"# CLIP-debias sensitivity on {table['task']}", "",
           f"One factor at a time; the others at the config's values. Seeds {table['seeds']}; "
           f"ERM reference worst-group accuracy {_pm(table['erm'].get('worst_group_accuracy'))}.",
           "", "| factor | value | accuracy | worst group | worst pseudo group | ARI | "
           "seconds (0: reused) |",
           "|---|---|---|---|---|---|---|"]
  for row in table["rows"]:
    ari = row.get("ari", math.nan)
    lines.append(f"| {row['factor']} | {row['value']} | {_pm(row['accuracy'])} | "
                 f"{_pm(row.get('worst_group_accuracy'))} | "
                 f"{_pm(row['worst_pseudo_group_accuracy'])} | "
                 f"{'n/a' if math.isnan(ari) else f'{ari:.3f}'} | {row['seconds']:.0f} |")
  lines.append(f"\nTotal time {table['seconds']:.0f} s.")
  return "\n".join(lines) + "\n"


def sensitivity_plot(table: dict) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  factors = list(dict.fromkeys(r["factor"] for r in table["rows"]))
  fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3), squeeze=False)
  erm = table["erm"].get("worst_group_accuracy")
  for ax, factor in zip(axes[0], factors):
    rows = [r for r in table["rows"] if r["factor"] == factor]
    x = range(len(rows))
    for key, name in (("worst_group_accuracy", "worst group"), ("accuracy", "accuracy")):
      if rows[0].get(key) is None:
        continue
      ax.errorbar(x, [100 * r[key][0] for r in rows], [100 * r[key][1] for r in rows],
                  marker="o", capsize=3, label=name)
    if erm is not None:
      ax.axhline(100 * erm[0], color="grey", ls="--", label="ERM worst group")
    ax.set_xticks(list(x), [str(r["value"]) for r in rows], rotation=20)
    ax.set_title(factor)
    ax.set_ylabel("test %")
  axes[0][0].legend(fontsize=7)
  data = _png(fig)
  plt.close(fig)
  return data


def write_sensitivity(table: dict, workdir: str) -> list[str]:
  return [atomic_write(os.path.join(workdir, "sensitivity.json"), json.dumps(table, indent=1)),
          atomic_write(os.path.join(workdir, "sensitivity.md"), sensitivity_markdown(table)),
          atomic_write(os.path.join(workdir, "sensitivity.png"), sensitivity_plot(table))]
