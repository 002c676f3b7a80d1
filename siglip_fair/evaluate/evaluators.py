"""Evaluators: embed an eval split with the current params and yield metrics.

The protocol and shared pieces are in `base`; this module has the quality evaluators
(zero-shot, retrieval), the registry of every evaluator type (bias ones in
`bias_evaluators`) and the helpers that build and run them.

Config (`config.evals`): name -> sub-config; `type` selects the class (it
defaults to the name), e.g.

    config.evals.zeroshot = dict(type="zeroshot", classes=["cat", "car"])
    config.evals.rb = dict(type="representation_bias")
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from siglip_fair.evaluate import ceiling, metrics, prompts
from siglip_fair.evaluate.base import (DEFAULT_OCCUPATION_PAIRS, EvalContext, Evaluator,
                                       Tokenizer, embed_fixed, labelled, mean_last,
                                       preprocess_images, word_sets)
from siglip_fair.evaluate.bias_evaluators import (AssociationBias, AttributeAccuracy,
                                                  RepresentationBias, RetrievalSkew)

__all__ = [
    "AssociationBias", "AttributeAccuracy", "DEFAULT_OCCUPATION_PAIRS", "EVALUATORS",
    "EvalContext", "Evaluator", "Retrieval", "RepresentationBias", "RetrievalSkew",
    "Tokenizer", "ZeroShot", "as_rows", "build_evaluators", "default_evals_config",
    "embed_fixed", "preprocess_images", "run_all",
]


class ZeroShot(Evaluator):
  """Top-k zero-shot classification with template-ensembled class prompts.

  Config: `classes` (names in label order, or name -> synonyms), `label_key`
  (int field, -1 = unlabelled and skipped), `templates`, `ks`, `chunk_size` (images
  scored against all classes at once).
  Yields prefix + top{k} with _lo/_hi (bootstrap over images). With
  `template_bootstrap` = S > 0 also top{k}_tpl_lo/_tpl_hi: the interval over S ensembles of
  templates drawn with replacement, i.e. how much the number depends on the prompt choice.
  """
  DEFAULTS = {"split": "objects", "classes": None, "label_key": "object_label",
              "templates": prompts.DEFAULT_TEMPLATES, "ks": (1, 5), "chunk_size": 4096,
              "template_bootstrap": 0, "prefix": "zeroshot/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    if not self.config["classes"]:
      raise ValueError("ZeroShot needs `classes`: the class names in label "
                       "order (e.g. the world's OBJECT_CLASSES) or a dict "
                       "name -> synonyms.")
    self._prompts = self._encode_prompt_sets(word_sets(self.config["classes"]))

  def run(self, params):
    prompt_emb = self._embed_prompts(params, self._prompts)  # once, for both ensembles
    class_emb = metrics.prompt_ensemble(prompt_emb, self._prompts[1])
    emb, values = self._embed_split(params, [self.config["label_key"]])
    labels = np.asarray(values[self.config["label_key"]], np.int64)
    keep = labelled(labels, self)
    ranks = metrics.zeroshot_ranks(emb[keep], class_emb, labels[keep],
                                   self.config["chunk_size"])
    for k in self.config["ks"]:
      yield from self._with_ci(f"top{k}", mean_last, (ranks < k).astype(np.float32))
    if self.config["template_bootstrap"]:
      yield from self._template_intervals(prompt_emb, emb[keep], labels[keep])

  def _template_intervals(self, prompt_emb, emb, labels):
    spans = self._prompts[1]
    num_templates = len(self.config["templates"])
    cfg = self.config["bootstrap"]
    rng = np.random.default_rng(cfg["seed"])
    ks = self.config["ks"]
    samples = []
    for _ in range(int(self.config["template_bootstrap"])):
      counts = np.bincount(rng.integers(num_templates, size=num_templates),
                           minlength=num_templates)
      # Rows of a span are word-major, so row r uses template r % T.
      class_emb = metrics.l2_normalize(np.stack([
          counts[np.arange(span.stop - span.start) % num_templates] @ prompt_emb[span]
          for span in spans]))
      ranks = metrics.zeroshot_ranks(emb, class_emb, labels, self.config["chunk_size"])
      samples.append([np.mean(ranks < k) for k in ks])
    alpha = cfg["alpha"]
    lo, hi = np.quantile(np.asarray(samples), [alpha / 2, 1 - alpha / 2], axis=0)
    for i, k in enumerate(ks):
      yield f"{self.prefix}top{k}_tpl_lo", float(lo[i])
      yield f"{self.prefix}top{k}_tpl_hi", float(hi[i])


class Retrieval(Evaluator):
  """Image<->text Recall@k with all K captions of each image, and its ceiling.

  Config: `caption_key` (bytes [K] per record), `ks`, `chunk_size` (queries
  scored at once). Yields prefix + i2t_r{k}, t2i_r{k}, and i2t_r{k}_ceiling,
  t2i_r{k}_ceiling: the best R@k any model could reach when identical captions
  (case and whitespace aside) are one text to it (`ceiling`). The captions, and so
  the ceilings, do not depend on the model: they are read once, when the evaluator
  is built.
  """
  DEFAULTS = {"split": "retrieval", "caption_key": "captions",
              "ks": (1, 5, 10), "chunk_size": 1024, "prefix": "retrieval/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    key = self.config["caption_key"]
    if key not in self.source[0]:
      raise ValueError(f"Records of split {self.config['split']!r} have no field "
                       f"{key!r}; available: {sorted(self.source[0])}.")
    captions = [np.atleast_1d(self.source[i][key]).tolist() for i in range(len(self.source))]
    self._texts = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                   for caps in captions for c in caps]
    self._text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    self._ceilings = ceiling.retrieval_ceilings(self._texts, self._text_image, len(captions),
                                                self.config["ks"])

  def run(self, params):
    emb, _ = self._embed_split(params, [])
    text_emb = embed_fixed(self.context.embed_texts, params,
                           np.asarray(self.context.tokenizer.encode(self._texts)),
                           self.context.batch_size)
    recalls = metrics.retrieval_recalls(emb, text_emb, self._text_image,
                                        self.config["ks"], self.config["chunk_size"])
    yield from ((self.prefix + k, v) for k, v in recalls.items())
    yield from ((self.prefix + k, v) for k, v in self._ceilings.items())


EVALUATORS: dict[str, type[Evaluator]] = {
    "zeroshot": ZeroShot,
    "retrieval": Retrieval,
    "representation_bias": RepresentationBias,
    "association_bias": AssociationBias,
    "attribute_accuracy": AttributeAccuracy,
    "retrieval_skew": RetrievalSkew,
}


def default_evals_config(object_classes: Sequence[str], *,
                         occupation_pairs=DEFAULT_OCCUPATION_PAIRS,
                         groups: Sequence[str] = ("man", "woman"),
                         num_bootstrap: int = 1000,
                         group_words: Mapping[str, Sequence[str]] | None = None,
                         occupation_words: Mapping[str, Sequence[str]] | None = None,
                         templates: Sequence[str] = prompts.DEFAULT_TEMPLATES,
                         ) -> ml_collections.ConfigDict:
  """The study's five evaluators, with the bias evaluators' prompt sets spelled out.

  RB, AB and attribute accuracy embed each group / occupation as the mean of its synonyms
  in every template (the CLIP ensemble); every set is a config field, so e.g.
  `--config.evals.rb.group_words.man='["man", "guy"]'` or
  `--config.evals.ab.templates='["a photo of a {}."]'` changes it, and
  `--config.evals.rb.single_prompt=true` measures with one prompt per set (first word,
  first template).

  Args:
    object_classes: class names in `object_label` order (world.OBJECT_CLASSES).
    occupation_pairs: (first, second) occupation NAMES, first stereotypically
      female (the world's OCCUPATION_PAIRS hold indices into OCCUPATIONS).
    groups: group names in the order of the `gender` field (world.GROUPS).
    num_bootstrap: bootstrap replicates per interval (0 = no intervals).
    group_words: group -> synonyms for RB and attribute accuracy; None:
      `prompts.DEFAULT_GROUP_WORDS` (a group it lacks is its own word).
    occupation_words: occupation -> synonyms for AB; None: each occupation its own word.
    templates: the prompt templates (one "{}") of RB, AB and attribute accuracy.
  """
  pairs = [list(p) for p in occupation_pairs]
  if group_words is None:
    group_words = {g: prompts.DEFAULT_GROUP_WORDS.get(g, (g,)) for g in groups}
  names = dict.fromkeys(n for p in pairs for n in p)
  occupation_words = {n: [n] for n in names} | dict(occupation_words or {})

  def sets(words):  # fresh copies: ConfigDict would share one dict between evaluators
    return {"templates": list(templates), "single_prompt": False,
            **{k: {n: list(w) for n, w in v.items()} for k, v in words.items()}}

  return ml_collections.ConfigDict({
      "zeroshot": {"type": "zeroshot", "classes": list(object_classes),
                   "bootstrap": {"num_samples": num_bootstrap}},
      "retrieval": {"type": "retrieval"},
      "rb": {"type": "representation_bias", **sets({"group_words": group_words}),
             "bootstrap": {"num_samples": num_bootstrap}},
      "ab": {"type": "association_bias", "groups": list(groups), "pairs": pairs,
             **sets({"label_words": occupation_words}),
             "bootstrap": {"num_samples": num_bootstrap}},
      "gender_acc": {"type": "attribute_accuracy", "groups": list(groups),
                     **sets({"group_words": group_words}),
                     "bootstrap": {"num_samples": num_bootstrap}},
  })


def evaluator_class(name: str, sub: Mapping[str, Any]) -> type[Evaluator]:
  """The class of evaluator `name` (its `type`, defaulting to the name); no data needed, so
  the command line checks `config.evals` before it builds or writes anything."""
  kind = sub.get("type", name)
  if kind not in EVALUATORS:
    raise ValueError(f"config.evals.{name}.type={kind!r} is not an evaluator type; known types: "
                     f"{sorted(EVALUATORS)}{_close(kind, EVALUATORS)}.")
  return EVALUATORS[kind]


def _close(word, choices) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  match = difflib.get_close_matches(str(word), list(choices), n=1)
  return f" (did you mean {match[0]!r}?)" if match else ""


def build_evaluators(config: Mapping[str, Any], context: EvalContext) -> dict[str, Evaluator]:
  """Builds one evaluator per entry of `config` (usually `config.evals`)."""
  return {name: evaluator_class(name, sub)(sub, context) for name, sub in dict(config).items()}


def as_rows(results: Mapping[str, float]) -> list[dict[str, Any]]:
  """{name: v, name_lo: l, name_hi: h, ...} -> [{"metric": name, "value": v, "lo": l, "hi": h}]
  in name order; lo/hi are None where no interval was computed. One row per metric is the
  shape dataframes and sweep tables read directly."""
  bounds = ("_lo", "_hi", "_tpl_lo", "_tpl_hi")
  rows = []
  for name in sorted(results):
    if name.endswith(bounds) and any(name == base + b for b in bounds for base in results):
      continue
    row = {"metric": name, "value": results[name]}
    for suffix in bounds:
      row[suffix.strip("_")] = results.get(name + suffix)
    rows.append(row)
  return rows


def run_all(evaluators: Mapping[str, Evaluator], params) -> dict[str, float]:
  """Runs every evaluator; metric names must be unique across evaluators."""
  results = {}
  for name, evaluator in evaluators.items():
    for metric, value in evaluator.run(params):
      if metric in results:
        raise ValueError(f"Evaluator {name!r} yields {metric!r}, which another "
                         "evaluator already produced; give one a different "
                         "`prefix` or `name`.")
      results[metric] = value
  return results
