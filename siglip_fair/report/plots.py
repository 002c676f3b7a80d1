"""Report plots: training curves of several runs and bias bars per model.

RB / AB panels are labelled with their unit, points (`summary.metric_unit`).

Figures are built with the object-oriented matplotlib API on an Agg canvas, so
nothing touches pyplot's global state or needs a display.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from siglip_fair.io import atomic_write
from siglip_fair.report.summary import metric_names, metric_unit

DEFAULT_CURVES = ("loss", "bias/rb", "bias/ab_mean", "bias/gender_acc",
                  "zeroshot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl file; "nan"/"inf" strings become floats."""
  if not os.path.isfile(path):
    raise ValueError(f"Metrics file {path!r} does not exist.")
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not a JSON object ({e}).") from e
  return records


def _float(value) -> float:
  """A number (or "nan"/"inf" as MetricWriter stores them) as float; else NaN."""
  if isinstance(value, bool):
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _grid(num_panels: int, width: float = 4.0, height: float = 3.0):
  cols = min(3, num_panels)
  rows = math.ceil(num_panels / cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  return fig, axes[:num_panels]


def _save(fig: Figure, out_png: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return atomic_write(out_png, buffer.getvalue())


def plot_training_curves(metrics_jsonl_paths: Mapping[str, str], out_png: str, *,
                         metrics: Sequence[str] | None = None,
                         x: str = "step") -> str:
  """One panel per metric, one line per run, against `x`.

  Args:
    metrics_jsonl_paths: run name -> metrics.jsonl (one JSON object per line
      with `x` and metric keys, as train.progress.MetricWriter writes).
    out_png: output file (written atomically).
    metrics: keys to plot; default: those of DEFAULT_CURVES present in any run.
      A key's `_lo` / `_hi` bounds, when logged, are drawn as a band.
    x: the x-axis key, "step" or "examples_seen".

  Returns:
    out_png.
  """
  runs = {name: read_jsonl(path) for name, path in metrics_jsonl_paths.items()}
  present = {k for records in runs.values() for r in records for k in r}
  if metrics is None:
    metrics = [m for m in DEFAULT_CURVES if m in present]
  missing = [m for m in metrics if m not in present]
  if not metrics or missing:
    raise ValueError(f"Nothing to plot for metrics {list(metrics) or None} "
                     f"(missing: {missing}); the files log {sorted(present)}.")
  fig, axes = _grid(len(metrics))
  for ax, metric in zip(axes, metrics):
    for i, (name, records) in enumerate(runs.items()):
      points = [(_float(r.get(x)), _float(r[metric]), _float(r.get(metric + "_lo")),
                 _float(r.get(metric + "_hi"))) for r in records if metric in r]
      points = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
      if not points:
        continue
      xs, ys, lo, hi = zip(*sorted(points))
      ax.plot(xs, ys, color=f"C{i}", label=name, marker="o" if len(xs) <= 30 else None,
              markersize=3)
      if all(map(math.isfinite, lo + hi)):
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_title(metric)
    ax.set_xlabel(x)
    ax.set_ylabel(metric_unit(metric))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  return _save(fig, out_png)


def plot_bias_bars(rows: Sequence[Mapping[str, Any]], out_png: str, *,
                   metrics: Sequence[str] | None = None) -> str:
  """Bars per model with bootstrap error bars, one panel per bias metric.

  Args:
    rows: summary rows ({"model": name, metric: value, metric_lo, metric_hi}).
    out_png: output file (written atomically).
    metrics: default "bias/rb", "bias/ab_mean" and every per-pair "bias/ab/...".

  Returns:
    out_png.
  """
  present = metric_names(rows)
  if metrics is None:
    metrics = [m for m in ("bias/rb", "bias/ab_mean") if m in present]
    metrics += [m for m in present if m.startswith("bias/ab/")]
  if not metrics:
    raise ValueError(f"No bias metrics to plot; rows have keys {present}.")
  models = [row["model"] for row in rows]
  fig, axes = _grid(len(metrics), width=max(3.0, 0.8 * len(models) + 1.5))
  for ax, metric in zip(axes, metrics):
    values = [_float(row.get(metric)) for row in rows]
    lo = [_float(row.get(metric + "_lo")) for row in rows]
    hi = [_float(row.get(metric + "_hi")) for row in rows]
    # NaN error bars (rows without bounds) are not drawn.
    err = [[v - l for v, l in zip(values, lo)], [h - v for v, h in zip(values, hi)]]
    ax.bar(range(len(models)), values, yerr=err, capsize=4,
           color=[f"C{i}" for i in range(len(models))])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_title(metric)
    ax.set_ylabel(metric_unit(metric))
    ax.grid(axis="y", alpha=0.3)
  return _save(fig, out_png)


def plot_data_card(card: Mapping[str, Any], out_png: str, *, top: int = 12) -> str:
  """The M4 data card at a glance: group prevalence (before, after, target) and the `top`
  largest associations P(s|x) − P(s) before and after balancing.

  Args:
    card: a data card (`balance.card.data_card`, or card.json).
    out_png: output file (written atomically).

  Returns:
    out_png.
  """
  groups = card.get("groups") or []
  if not groups:
    raise ValueError("The data card has no groups to plot.")
  assoc = sorted((a for a in card.get("association", []) if a.get("before") is not None),
                 key=lambda a: -abs(a["before"]))[:top]
  fig, axes = _grid(2 if assoc else 1, width=5.0, height=3.5)
  names = [g["name"] for g in groups]
  x = range(len(groups))
  ax = axes[0]
  for k, (key, label) in enumerate((("before", "before"), ("after", "after"),
                                    ("target", "target"))):
    ax.bar([i + (k - 1) * 0.27 for i in x], [_float(g.get(key)) for g in groups], width=0.27,
           label=label, color=f"C{k}")
  ax.set_xticks(list(x), names)
  ax.set_title(f"prevalence (kept {card['kept']['expected']:.2f}, {card['verdict']})")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  if assoc:
    ax = axes[1]
    y = range(len(assoc))
    ax.barh([i + 0.2 for i in y], [a["before"] for a in assoc], height=0.4, label="before",
            color="C0")
    ax.barh([i - 0.2 for i in y], [_float(a["after"]) for a in assoc], height=0.4,
            label="after", color="C1")
    ax.set_yticks(list(y), [a["name"] for a in assoc], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_title("association P(s|x) − P(s)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
  return _save(fig, out_png)
