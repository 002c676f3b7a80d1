"""Bias and quality of a released model (configs/released.py; `siglip-fair eval`).

`evaluate(config, workdir)` loads the checkpoint of `config.released` with its family's
preprocessing (models/released.py), reads every prepared dataset of `config.eval_data` through
that preprocessing (raw images resized, cropped and normalised as the checkpoint was trained:
data/preprocess.py), runs the evaluators of `config.evals` and writes what training runs
write: eval.json, eval_rows.json and summary.json / summary.md.

Besides the project's evaluators (evaluators.EVALUATORS), `income_zeroshot` is Dollar Street's
protocol of SigLIP 2's Table 9: zero-shot top-k over the split's topics, per income quartile,
and the top-minus-bottom quartile disparity.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from siglip_fair.evaluate import fairness, metrics, prompts
from siglip_fair.evaluate.base import EvalContext, Evaluator, labelled, mean_last
from siglip_fair.io import atomic_write

QUARTILES = ("q1", "q2", "q3", "q4")  # income_quartile 0 (poorest) .. 3 (richest)


class IncomeZeroShot(Evaluator):
  """Zero-shot top-k on Dollar Street by income quartile.

  The classes are `classes` (names, or name -> synonyms) or, when None, every topic of the
  split (sorted): an image is correct when its own topic is among the k best-scoring classes.
  Yields prefix + top{k} (with _lo/_hi), top{k}/q1..q4 (quartile 0 = poorest) and
  top{k}_disparity = top{k}/q4 - top{k}/q1 in accuracy (the richest minus the poorest quartile).
  """
  DEFAULTS = {"split": "dollar_street", "label_key": "topic", "group_key": "income_quartile",
              "classes": None, "templates": prompts.DEFAULT_TEMPLATES, "ks": (5,),
              "chunk_size": 4096, "prefix": "dollar_street/"}

  def run(self, params):
    emb, values = self._embed_split(params, [self.config["label_key"], self.config["group_key"]])
    topics = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
              for t in values[self.config["label_key"]]]
    classes = self.config["classes"] or sorted(set(topics))
    sets = classes if isinstance(classes, dict) else {c: [c] for c in classes}
    index = {name: i for i, name in enumerate(sets)}
    labels = np.array([index.get(t, -1) for t in topics], np.int64)
    keep = labelled(labels, self)
    class_emb = self._embed_prompt_sets(params, self._encode_prompt_sets(sets))
    ranks = metrics.zeroshot_ranks(metrics.l2_normalize(emb[keep]), class_emb, labels[keep],
                                   self.config["chunk_size"])
    quartile = np.asarray(values[self.config["group_key"]], np.int64)[keep]
    for k in self.config["ks"]:
      correct = (ranks < int(k)).astype(np.float32)
      yield from self._with_ci(f"top{k}", mean_last, correct)
      per_group, _, _ = fairness.group_accuracies(correct, quartile, len(QUARTILES))
      for name, value in zip(QUARTILES, per_group):
        yield f"{self.prefix}top{k}/{name}", float(value)
      yield f"{self.prefix}top{k}_disparity", float(per_group[-1] - per_group[0])


CUSTOM = {"income_zeroshot": IncomeZeroShot}


def load(config):
  """(spec, params, tokenizer, model) of `config.released` with config.tokenizer and
  config.preprocess overrides (None fields: the checkpoint's preset)."""
  from siglip_fair.models import released  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.two_tower import make_model  # pylint: disable=g-import-not-at-top
  r = config.released
  if not r.path:
    raise ValueError("released.path is empty; pass the checkpoint, e.g. "
                     "--config configs/released.py:source=hf,path=DIR.")
  spec = released.resolve(r.path, source=r.get("source", ""), family=r.get("family", ""),
                          tokenizer=dict(config.get("tokenizer") or {}),
                          image=dict(config.get("preprocess") or {}), scan=r.get("scan", False))
  for key, value in dict(config.get("model") or {}).items():
    spec.model[key] = value  # e.g. dtype='bfloat16' on accelerators
  params = released.load_params(spec, resize_posemb=r.get("resize_posemb", False),
                                 posemb_method=r.get("posemb_method", "zoom"))
  tokenizer = released.make_tokenizer(spec)
  return spec, params, tokenizer, make_model(ml_collections.ConfigDict(spec.model))


def sources(config, image_cfg) -> dict[str, Any]:
  """{name: source} of `config.eval_data` (dict(dataset, split, data_dir)), every image read
  raw and preprocessed by `image_cfg` (the checkpoint's rules)."""
  from siglip_fair.data import datasets  # pylint: disable=g-import-not-at-top
  from siglip_fair.data.preprocess import ImageView  # pylint: disable=g-import-not-at-top
  out = {}
  for name, spec in dict(config.get("eval_data") or {}).items():
    unknown = set(spec) - {"dataset", "split", "data_dir"}
    if unknown or "dataset" not in spec or "split" not in spec:
      raise ValueError(f"config.eval_data.{name} needs dataset and split (optional data_dir); "
                       f"got {sorted(spec)}.")
    data_dir = spec.get("data_dir") or config.get("data_dir") or None
    raw = datasets.load_source(spec["dataset"], spec["split"], data_dir=data_dir)
    out[name] = ImageView(raw, image_cfg)
  return out


def build(config, context: EvalContext) -> dict[str, Evaluator]:
  """The evaluators of config.evals: the project's types and CUSTOM ones."""
  from siglip_fair.evaluate import evaluators as ev  # pylint: disable=g-import-not-at-top
  evals = config.evals.to_dict() if hasattr(config.evals, "to_dict") else dict(config.evals)
  custom = {n: s for n, s in evals.items() if s.get("type", n) in CUSTOM}
  out = ev.build_evaluators({n: s for n, s in evals.items() if n not in custom}, context)
  for name, sub in custom.items():
    out[name] = CUSTOM[sub.get("type", name)](sub, context)
  return out


def evaluate(config, workdir: str) -> tuple[dict, str]:
  """Evaluates `config.released` on `config.eval_data` with `config.evals`; writes
  eval.json, eval_rows.json, summary.json / summary.md and released.json (the resolved model,
  tokenizer and preprocessing) to `workdir`. Returns (metrics, path of eval.json)."""
  # pylint: disable=g-import-not-at-top
  from siglip_fair.evaluate import evaluators as ev
  from siglip_fair.models.two_tower import embed_fns, temperature
  from siglip_fair.report.summary import write_summary
  from siglip_fair.train.sharding import make_mesh
  # pylint: enable=g-import-not-at-top
  if not config.get("evals"):
    raise ValueError("config.evals is empty: name the prepared datasets to evaluate on, e.g. "
                     "configs/released.py:...,datasets=fairface+cifar100.")
  spec, params, tokenizer, model = load(config)
  embed_images, embed_texts = embed_fns(model, make_mesh(config.get("mesh")))
  context = EvalContext(embed_images=embed_images, embed_texts=embed_texts,
                        tokenizer=tokenizer, sources=sources(config, spec.preprocess),
                        batch_size=int(config.get("eval_batch_size", 64)),
                        temperature=temperature)
  result = ev.run_all(build(config, context), params)
  result["step"] = 0  # a released model: no training step of ours
  os.makedirs(workdir, exist_ok=True)
  atomic_write(os.path.join(workdir, "released.json"), json.dumps(spec.to_dict(), indent=1))
  atomic_write(os.path.join(workdir, "eval_rows.json"), json.dumps(ev.as_rows(result), indent=1))
  name = os.path.basename(os.path.normpath(spec.released.path))
  write_summary([{"model": name, **{k: v for k, v in result.items() if k != "step"}}], workdir,
                notes=[f"{name}: {spec.released.source} checkpoint, preprocessing preset "
                       f"{spec.released.family!r} (released.json)"])
  path = atomic_write(os.path.join(workdir, "eval.json"), json.dumps(result, indent=1))
  return result, path
