"""Sensitivity of CLIP-debias to its choices (SPEC §6): the prompt set, the number of clusters k,
the re-sampling frequency F and the temperature τ, one factor at a time with the others at the
config's values, each against the same ERM reference. `python -m siglip_fair debias
--config configs/debias.py:task=world,analysis=sensitivity` writes sensitivity.{json,md,png}.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from siglip_fair.debias import infer, run as run_lib, tasks

FACTORS = ("prompt_sets", "k", "refresh_every", "tau")


def _cell(records, key):
  """[mean, std, n] of one test metric over the records (one method), or None."""
  return run_lib.summarize(records)[records[0]["method"]].get(key)


def run(config, workdir: str, log: Callable[[str], None] = print,
        get_handle: Callable[[], infer.TwoTowerHandle] | None = None) -> dict:
  """The sensitivity table on config.task; returns (and writes) it (get_handle as in
  `run.run`)."""
  from siglip_fair.debias import report
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  sens = config.sensitivity
  unknown = sorted(set(sens.keys()) - set(FACTORS) - {"seeds"})
  if unknown:
    raise ValueError(f"sensitivity has unknown field(s) {unknown}; expected {FACTORS} and seeds.")
  task = tasks.load_task(config.task)
  handles, sims = [], {}

  def handle():
    # Loaded once, and only if some prompt set's similarities are not cached yet.
    if not handles:
      handles.append(get_handle() if get_handle else
                     infer.load_two_tower(config.clip, workdir, log))
    return handles[0]

  def sims_for(name):
    if name not in sims:
      sims[name] = run_lib.similarities(config, workdir, task, name, get_handle=handle, log=log)
    return sims[name]

  def trainings(cfg, groups, quality, method="clip_debias"):
    splits = run_lib.splits_for_training(task, groups)
    tag = run_lib._digest(cfg.task, cfg.target, cfg.cluster, cfg.prompts.use)
    t0 = time.perf_counter()
    records = [run_lib.train_one(cfg, task, splits, method, int(s), os.path.join(
        workdir, "runs", tag, f"{method}_seed{s}.json"), log) for s in sens.seeds]
    row = {k: _cell(records, k) for k in ("accuracy", "worst_group_accuracy",
                                            "worst_pseudo_group_accuracy")}
    row.update(ari=quality.get("ari", float("nan")), seconds=time.perf_counter() - t0)
    return row

  base_groups, base_quality = run_lib.pseudo_groups(config, task, sims_for(None))
  erm = trainings(config, base_groups, base_quality, method="erm")
  rows = []
  for factor in FACTORS:
    for value in sens[factor]:
      cfg = config.copy_and_resolve_references()
      groups, quality = base_groups, base_quality
      if factor == "prompt_sets":
        cfg.prompts.use = value
        groups, quality = run_lib.pseudo_groups(cfg, task, sims_for(value))
      elif factor == "k":
        cfg.cluster.k = int(value)
        groups, quality = run_lib.pseudo_groups(cfg, task, sims_for(None), k=int(value))
      else:
        cfg.target[factor] = value
      row = trainings(cfg, groups, quality)
      row.update(factor=factor, value=value if factor != "tau" else str(value))
      rows.append(row)
      log(f"debias sensitivity: {factor}={value}: worst group "
          f"{row['worst_group_accuracy'][0] if row['worst_group_accuracy'] else float('nan'):.3f}")
  table = {"task": task.name, "seeds": list(sens.seeds), "erm": erm, "rows": rows,
           "seconds": time.perf_counter() - start}
  for path in report.write_sensitivity(table, workdir):
    log(f"debias: wrote {path}")
  return table
