"""A training run's record: `config.json` and `fingerprint.json` in its workdir, and evaluating a
run from that record.

The record is written once, when a fresh run has passed every check and its state was
initialised (never by a rejected resume), and is never replaced. A resume compares what it
would train with against the record: the run's results-relevant config (presentation fields
such as `progress` aside), the training data's identity and the fingerprints of the keep masks
it trains on; any difference is an error that names it, since resuming would silently mix two
experiments in one set of results.

`evaluate(workdir, overrides, output)` evaluates a run's latest checkpoint with the run's own
config; overrides may change evaluation fields only, and the results go to new files
(`eval_step<N>.json`) in the run folder or in `output`, so a read-only run can be evaluated and
its eval.json is never rewritten.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections

from siglip_fair import fingerprint
from siglip_fair.io import atomic_write

CONFIG = "config.json"
_VIA_MASKS = ("balance", "annotate", "annotations_dir")
# Fields an evaluation of an existing run may set: what is evaluated, where the data are and how
# the work is laid out; nothing that changes the trained model.
EVAL_FIELDS = ("evals", "eval_data", "eval_batch_size", "data_dir", "mesh", "progress",
               "tensorboard", "peak_flops")


def to_config(value: Any) -> Any:
  """JSON (as read from config.json) back to a ConfigDict; lists become tuples, as the shipped
  configs write sequences."""
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: to_config(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(to_config(v) for v in value)
  return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      return to_config(json.load(f))
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path} does not exist: {workdir!r} holds no training run (its config.json is written "
        "when training starts); pass the workdir of a run.") from None
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it from a copy of the run.") from None


def wanted(config, data_identity: dict, masks: dict) -> dict:
  """The fingerprint of a run: its config (presentation fields aside), data and keep masks."""
  from siglip_fair import __version__
  settings = fingerprint.run_config(config)
  # The balancing settings act through the keep masks, whose fingerprints stand for them: a
  # baseline run does not depend on them at all.
  for key in _VIA_MASKS:
    settings.pop(key, None)
  return {"stage": "train", "package": __version__, "config": settings,
          "data": data_identity, "masks": masks}


def start(workdir: str, config, want: dict, start_step: int, *, lead: bool) -> None:
  """Called once the train state is initialised or restored: a fresh run writes its record
  (fingerprint.json, then config.json); a resumed or finished run checks it."""
  if start_step == 0:
    if lead:
      fingerprint.write(workdir, want)
      atomic_write(os.path.join(workdir, CONFIG), config.to_json_best_effort(indent=1))
    return
  stored = fingerprint.read(workdir)
  if stored is None:
    return  # a run recorded before fingerprints: nothing to check against
  diffs = fingerprint.compare(stored, want)
  if diffs:
    raise ValueError(
        f"{workdir} holds a run trained (to step {start_step}) from other inputs: "
        f"{'; '.join(diffs)}. Resuming would mix two experiments; rerun with the settings in "
        f"{os.path.join(workdir, CONFIG)}, or use a fresh --workdir.")


def eval_config(workdir: str, overrides: Sequence[tuple[str, str]] = (),
                given: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The run's own config with evaluation-only changes: `given` (a --config file's config,
  compared with the run's) and `overrides` (--config.key=value)."""
  from siglip_fair.config.loading import ConfigError, apply_overrides
  config = read_config(workdir)
  if given is not None:
    theirs, ours = fingerprint.plain(given), fingerprint.plain(config)
    changed = [d for d in fingerprint.compare(ours, theirs, limit=1000)
               if d.split(" ")[0].split(".")[0] not in EVAL_FIELDS
               and d.split(" ")[0] not in fingerprint.PRESENTATION_FIELDS]
    if changed:
      raise ConfigError(
          f"--config differs from the run's own {os.path.join(workdir, CONFIG)} outside the "
          f"evaluation fields ({', '.join(EVAL_FIELDS)}): {'; '.join(changed[:4])}"
          f"{' ...' if len(changed) > 4 else ''}. eval uses the run's config; leave --config "
          "out, or change evaluation fields only.")
    for key in EVAL_FIELDS:
      if key in given:
        config[key] = given[key]
  bad = [k for k, _ in overrides if k.split(".")[0] not in EVAL_FIELDS]
  if bad:
    raise ConfigError(
        f"eval cannot change {', '.join('--config.' + k for k in bad)}: the run was trained with "
        f"its {CONFIG}; eval may set only {', '.join(EVAL_FIELDS)} (and their members).")
  return apply_overrides(config, overrides)


def evaluate(workdir: str, config, output: str | None = None) -> tuple[dict, str]:
  """Evaluates the latest checkpoint of the run in `workdir` with `config` (see eval_config);
  writes eval_step<N>.json and eval_step<N>_rows.json to `output` (default: the run folder).
  Returns (metrics, path of the JSON)."""
  from siglip_fair import study
  from siglip_fair.evaluate import evaluators as ev
  from siglip_fair.models.two_tower import make_model
  from siglip_fair.train import checkpoint
  step = checkpoint.latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir!r}; train a model there "
                            "first (siglip-fair train --workdir ...).")
  output = output or workdir
  data = study.prepare_data(config, workdir)
  params = checkpoint.load_params(workdir, step)
  evaluators = study.make_evaluators(config, data, make_model(config.model), bootstrap=True)
  result = ev.run_all(evaluators, params)
  result["step"] = step
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, f"eval_step{step}.json")
  atomic_write(os.path.join(output, f"eval_step{step}_rows.json"),
               json.dumps(ev.as_rows(result), indent=1))
  atomic_write(path, json.dumps(result, indent=1))
  return result, path
