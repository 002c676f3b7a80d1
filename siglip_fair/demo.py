"""The end-to-end study on the synthetic biased world, baseline vs M4-balanced.

world (planted gender<->occupation association and representation skew) -> text annotation ->
M4 -> SigLIP on baseline and on balanced data (same steps) -> quality and bias evaluation ->
summary.json / summary.md / plots in the workdir. Reruns resume each stage. RB and AB, model-
and data-level, are in points (`report.summary.UNITS_NOTE`).
"""
from __future__ import annotations

import os
import time

import numpy as np

from siglip_fair import study
from siglip_fair.data import world
from siglip_fair.evaluate.data_bias import data_bias_metrics
from siglip_fair.report import glance, plots, summary

# Metrics of the side-by-side table, in display order.
TABLE_METRICS = (
    "zeroshot/top1", "zeroshot/top5", "retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r5",
    "retrieval/t2i_r5", "bias/rb", "bias/ab_mean", "bias/ab_argmax_mean", "bias/gender_acc",
    "kept_fraction", "data/rb", "data/ab_mean")


def _data_bias(ann, weights) -> dict[str, float]:
  pairs = [(world.OCCUPATIONS[i], world.OCCUPATIONS[j]) for i, j in world.OCCUPATION_PAIRS]
  return data_bias_metrics(ann, group_names=world.GROUPS, label_names=world.OCCUPATIONS,
                           pairs=pairs, q=weights)


def run(config, workdir: str) -> list[dict]:
  """Runs the study; returns one summary row per model (also written to the workdir)."""
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  config = config.copy_and_resolve_references()
  config.data_dir = study.data_dir(config, workdir)
  config.balance_dir = study.balance_dir(config, workdir)
  data = study.prepare_data(config, workdir, report=True)
  balanced = study.balance(config, workdir, data)
  ann, keep = balanced["annotations"], balanced["keep"]

  rows, curves = [], {}
  for version in config.demo.versions:
    run_cfg = config.copy_and_resolve_references()
    run_cfg.data_version = version
    run_dir = os.path.join(workdir, version)
    print(f"\n== training on {version} data ==")
    final = study.train_and_evaluate(run_cfg, run_dir, data=data)
    weights = keep.astype(np.float64) if version == "balanced" else None
    row = {"model": version, **final, **_data_bias(ann, weights),
           "kept_fraction": float(keep.mean()) if version == "balanced" else 1.0}
    rows.append(row)
    curves[version] = os.path.join(run_dir, "metrics.jsonl")

  answer = glance.sentences(rows[0], rows[1], rows[1]["model"]) if len(rows) == 2 else []
  summary.write_summary(rows, workdir, notes=answer)
  plots.plot_training_curves(curves, os.path.join(workdir, "curves.png"),
                             metrics=["loss", "bias/rb", "bias/ab_mean", "zeroshot/top1"])
  plots.plot_bias_bars(rows, os.path.join(workdir, "bias.png"))
  shown = [{"model": r["model"], **{k: v for k, v in r.items() if _shown(k)}} for r in rows]
  print("\n" + summary.format_table(shown) + summary.UNITS_NOTE)
  if answer:
    print("\nAt a glance (95 % intervals over evaluation images, one seed):\n" +
          "\n".join(f"- {line}" for line in answer))
  print(f"\nM4 data card: {os.path.join(config.balance_dir, 'card.md')}")
  print(f"summary: {os.path.join(workdir, 'summary.md')} (+ summary.json, curves.png, bias.png); "
        f"{time.perf_counter() - start:.0f} s")
  return rows


def _shown(key: str) -> bool:
  base = key[:-3] if key.endswith(("_lo", "_hi")) else key
  return base in TABLE_METRICS
