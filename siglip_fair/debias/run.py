"""CLIP-debias end to end on one task (SPEC §6): infer -> cluster -> train every method x seed
-> fairness table.

`run(config, workdir)` is the library entry point behind `python -m siglip_fair debias`.
Outputs in the workdir, each written atomically so a killed run resumes where it stopped:
  similarities_<hash>.npz  the prompt similarity vectors per split (reused across reruns);
  runs/<method>_seed<s>.json  one finished training (test metrics, validation curve);
  results.json / results.md / results.png  mean ± std over seeds per method, the pseudo-group
  quality (ARI, NMI, purity) and the share of the oracle's worst-group gain recovered.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from siglip_fair.debias import cluster, infer, tasks, trainer
from siglip_fair.debias.metrics import classification_fairness, pair_groups
from siglip_fair.io import atomic_savez, atomic_write

METRICS = ("accuracy", "worst_group_accuracy", "accuracy_gap", "demographic_parity_difference",
           "equalized_odds_difference")


def _digest(*parts) -> str:
  text = json.dumps([p.to_dict() if isinstance(p, ml_collections.ConfigDict) else p
                     for p in parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def prompt_set(config, name: str | None = None) -> dict[str, list[str]]:
  name = name or config.prompts.use
  sets = config.prompts.sets
  if name not in sets:
    raise ValueError(f"prompts.use / sensitivity.prompt_sets name {name!r}; the config defines "
                     f"prompt sets {sorted(sets)}.")
  return {k: list(v) for k, v in sets[name].items()}


def similarities(config, workdir: str, task: tasks.Task, prompt_name: str | None = None,
                 get_handle: Callable[[], infer.TwoTowerHandle] | None = None,
                 log=print) -> dict[str, np.ndarray]:
  """split -> float32 [n, A] similarities to the attribute prompts, cached in the workdir."""
  attrs = prompt_set(config, prompt_name)
  clip_id = {k: v for k, v in config.clip.items() if k != "config"}
  path = os.path.join(workdir, "similarities_" + _digest(
      config.task, attrs, list(config.prompts.templates), clip_id,
      config.clip.config.model, config.clip.config.total) + ".npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  handle = get_handle() if get_handle else infer.load_two_tower(config.clip, workdir, log)
  out = {s: infer.similarities(handle, a["image"], attrs, config.prompts.templates,
                               int(config.clip.batch_size)) for s, a in task.splits.items()}
  atomic_savez(path, **out)
  return out


def pseudo_groups(config, task: tasks.Task, sims: dict[str, np.ndarray],
                  k: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """(split -> int64 pseudo group [n], quality of the training clusters vs the true attribute).

  k-means is fitted on the standardised training vectors; val and test rows join the nearest
  centre. With cluster.cross_with_label, group = label * k + cluster.
  """
  cfg = config.cluster
  # k = 0: as many clusters as the sensitive attribute has values (SPEC §6.2).
  k = int((cfg.k or task.num_sensitive) if k is None else k)
  if k < 1:
    raise ValueError(f"cluster.k={k} must be >= 1 (or 0 for the number of attribute values).")
  train = infer.standardize(sims["train"])
  result = cluster.kmeans(train, k, key=jax.random.key(int(cfg.seed)), restarts=int(cfg.restarts),
                          iters=int(cfg.iters))
  centers = np.asarray(result.centers)
  groups, quality = {}, {}
  for split, s in sims.items():
    x = infer.standardize(s, sims["train"])
    c = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1).astype(np.int64)
    labels = task.splits[split]["label"]
    groups[split] = labels * k + c if cfg.cross_with_label else c
    if split == "train" and task.splits[split]["sensitive"] is not None:
      true = task.splits[split]["sensitive"]
      quality = {"ari": cluster.adjusted_rand_index(true, c),
                 "nmi": cluster.normalized_mutual_info(true, c),
                 "purity": cluster.purity(true, c),
                 "inertia": float(result.inertia)}
  return groups, quality


def splits_for_training(task: tasks.Task, groups) -> dict[str, trainer.Split]:
  out = {}
  for split, a in task.splits.items():
    true = (None if a["sensitive"] is None else
            pair_groups(a["label"], a["sensitive"], task.num_sensitive))
    out[split] = trainer.Split(a["image"], a["label"], groups[split], true)
  return out


def test_metrics(config, task, splits, result: trainer.Result) -> dict[str, float]:
  net = trainer.nets.make_net(config.target.net, task.num_classes,
                              **dict(config.target.net_kwargs))
  test = splits["test"]
  _, preds = trainer.evaluate(net, result.variables, test.images, test.labels,
                              int(config.target.batch_size))
  out = {}
  if task.splits["test"]["sensitive"] is not None:
    out.update(classification_fairness(test.labels, preds, task.splits["test"]["sensitive"],
                                       num_sensitive=task.num_sensitive))
  else:
    out["accuracy"] = float((preds == test.labels).mean())
  out["worst_pseudo_group_accuracy"] = trainer._worst(preds == test.labels, test.groups)
  return out


def train_one(config, task, splits, method: str, seed: int, path: str,
              log: Callable[[str], None] = print) -> dict:
  """One method x seed; reuses `path` when it was written by an earlier run."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = trainer.train_target(config.target, method, splits["train"], splits["val"], seed,
                                num_classes=task.num_classes)
  record = {"method": method, "seed": seed, "selected_step": result.selected_step,
            "seconds": result.seconds, "test": test_metrics(config, task, splits, result),
            "history": result.history}
  atomic_write(path, json.dumps(record, indent=1))
  t = record["test"]
  log(f"debias: {method:<17} seed {seed}  acc {t['accuracy']:.3f}  worst group "
      f"{t.get('worst_group_accuracy', float('nan')):.3f}  ({result.seconds:.0f} s)")
  return record


def summarize(records: list[dict]) -> dict[str, dict[str, list[float]]]:
  """method -> metric -> [mean, std (ddof=1; 0 for one seed), n] over seeds."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in records):
    rows = [r["test"] for r in records if r["method"] == method]
    out[method] = {}
    for key in rows[0]:
      v = np.array([r[key] for r in rows], np.float64)
      out[method][key] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)]
  return out


def oracle_gain_share(summary) -> float:
  """(worst-group accuracy of clip_debias - ERM) / (best oracle - ERM), from the seed means."""
  key = "worst_group_accuracy"
  oracles = [summary[m][key][0] for m in trainer.ORACLE if m in summary and key in summary[m]]
  if not oracles or "erm" not in summary or "clip_debias" not in summary:
    return float("nan")
  erm = summary["erm"][key][0]
  gain = max(oracles) - erm
  return float((summary["clip_debias"][key][0] - erm) / gain) if gain > 0 else float("nan")


def run(config, workdir: str, log: Callable[[str], None] = print,
        get_handle: Callable[[], infer.TwoTowerHandle] | None = None) -> dict:
  """The methods comparison on config.task; returns (and writes) the results.

  get_handle: supplies the two-tower model instead of `config.clip` (e.g. one already loaded
  in a notebook); called only when the similarities are not cached.
  """
  from siglip_fair.debias import report
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  task = tasks.load_task(config.task)
  log(f"debias: task {task.name}: " + ", ".join(
      f"{s} {len(a['label'])}" for s, a in task.splits.items()))
  sims = similarities(config, workdir, task, get_handle=get_handle, log=log)
  groups, quality = pseudo_groups(config, task, sims)
  log("debias: pseudo groups vs true attribute: " + ", ".join(
      f"{k} {v:.3f}" for k, v in quality.items()))
  splits = splits_for_training(task, groups)
  methods = [m for m in config.methods
             if not (m in trainer.ORACLE and task.splits["train"]["sensitive"] is None)]
  tag = _digest(config.task, config.target, config.cluster, config.prompts.use)
  records = []
  total = len(methods) * len(config.seeds)
  for i, (seed, method) in enumerate((s, m) for s in config.seeds for m in methods):
    records.append(train_one(config, task, splits, method, int(seed), os.path.join(
        workdir, "runs", tag, f"{method}_seed{seed}.json"), log))
    elapsed = time.perf_counter() - start
    log(f"debias: {i + 1}/{total} trainings done, {elapsed:.0f} s")
  summary = summarize(records)
  results = {"task": task.name, "methods": methods, "seeds": list(config.seeds),
             "pseudo_groups": quality, "summary": summary,
             "oracle_gain_share": oracle_gain_share(summary),
             "seconds": time.perf_counter() - start}
  for path in report.write_results(results, workdir):
    log(f"debias: wrote {path}")
  return results
