"""Summary of several models' metrics: summary.json and a Markdown table.

A row is one model: {"model": name, metric: value, metric_lo: ..., metric_hi:
...}. `metric_lo` / `metric_hi` (a confidence interval, as the evaluators
yield them) are shown with their metric, not as rows of their own.

Units: RB and AB (model- and data-level, with their intervals) are in points; everything
else the evaluators report is a fraction in [0, 1] or, for MaxSkew / NDKL, nats.
`metric_unit` names a metric's unit; `UNITS_NOTE` states them with every table.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from siglip_fair.io import atomic_write

_BOUNDS = ("_lo", "_hi")
# A path part rb, ab or rb_* / ab_* makes a metric an RB / AB quantity: bias/rb, bias/ab/<pair>,
# bias/ab_mean, bias/ab_argmax/<pair>, bias/ab_argmax_mean, data[/before|/after]/rb, data/ab/...
_POINTS_PARTS = ("rb", "ab")
UNITS_NOTE = ("RB and AB (`bias/rb`, `bias/ab*`, `data/rb`, `data/ab*`) are in points: 100 × a "
              "share or probability (RB = share − 1/2, in [−50, 50]; AB = a difference of two "
              "shares, in [−100, 100]). Accuracies, recalls, prevalences and fractions are in "
              "[0, 1].")


def metric_unit(name: str) -> str:
  """"points" for an RB / AB metric (or its _lo / _hi bound), else "" (a fraction, a loss,
  a count: whatever the metric itself is)."""
  base = name[:-3] if name.endswith(_BOUNDS) else name
  parts = base.split("/")
  return "points" if any(p in _POINTS_PARTS or p.startswith(("rb_", "ab_"))
                         for p in parts) else ""


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
  names = [row.get("model") for row in rows]
  if not rows or any(not isinstance(n, str) or not n for n in names):
    raise ValueError(f"Summary rows need a non-empty 'model' name each; got "
                     f"models {names}.")
  if len(set(names)) != len(names):
    raise ValueError(f"Model names must be unique (they become columns): {names}.")


def _is_bound(row: Mapping[str, Any], key: str) -> bool:
  return key.endswith(_BOUNDS) and key[:-3] in row


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Metrics in first-seen order, without 'model' and without _lo/_hi bounds."""
  _check_rows(rows)
  names = {}
  for row in rows:
    names.update((k, None) for k in row if k != "model" and not _is_bound(row, k))
  return list(names)


def _number(value) -> float | None:
  """A finite float, or None for NaN/inf/missing."""
  if value is None or isinstance(value, (str, bool)):
    return None
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


def format_cell(row: Mapping[str, Any], metric: str, fmt: str = "{:.4g}") -> str:
  """"value [lo, hi]", "value", "nan" or "–" (metric missing for this model)."""
  if metric not in row:
    return "–"
  value = row[metric]
  if isinstance(value, (str, bool)):
    return str(value)
  number = _number(value)
  if number is None:
    return "nan"
  text = fmt.format(number)
  lo, hi = (_number(row.get(metric + b)) for b in _BOUNDS)
  if lo is not None and hi is not None:
    text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
  return text


def format_table(rows: Sequence[Mapping[str, Any]], fmt: str = "{:.4g}") -> str:
  """Side-by-side Markdown table (rows = metrics, columns = models), with
  padded columns so it also reads well in a terminal."""
  _check_rows(rows)
  header = ["metric"] + [row["model"] for row in rows]
  body = [[m] + [format_cell(row, m, fmt) for row in rows] for m in metric_names(rows)]
  table = [[c.replace("|", r"\|") for c in line] for line in [header] + body]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
           for line in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines) + "\n"


def _json_value(value):
  if isinstance(value, str) or value is None:
    return value
  array = np.asarray(value)
  if array.ndim:
    return [_json_value(v) for v in array.tolist()]
  if array.dtype.kind in "iub":
    return array.item()
  return _number(value)  # NaN/inf -> null: summary.json stays strict JSON


def write_summary(rows: Sequence[Mapping[str, Any]], workdir: str,
                  fmt: str = "{:.4g}", notes: Sequence[str] = ()) -> tuple[str, str]:
  """Writes `workdir/summary.json` (a list of the rows; NaN as null) and
  `workdir/summary.md` (the `format_table` table, then `notes` as a list), atomically.

  Returns:
    (json_path, md_path).
  """
  _check_rows(rows)
  records = [{k: _json_value(v) for k, v in row.items()} for row in rows]
  json_path = atomic_write(os.path.join(workdir, "summary.json"),
                           json.dumps(records, indent=2, allow_nan=False) + "\n")
  markdown = ("# Summary\n\nCells are `value [lo, hi]` where a bootstrap "
              f"confidence interval is available. {UNITS_NOTE}\n\n" + format_table(rows, fmt))
  if notes:
    markdown += "\n## At a glance\n\n" + "".join(f"- {line}\n" for line in notes)
  md_path = atomic_write(os.path.join(workdir, "summary.md"), markdown)
  return json_path, md_path
