"""Bias evaluators (SPEC §3 and retrieval fairness): representation bias, association bias,
sensitive-attribute accuracy with per-group / worst-group rates, and MaxSkew / NDKL of
neutral text queries.

Two readings of each preference. The paper's (SPEC §3) counts, per image, which prompt is
closer: RB `rb` is a share of images, AB `ab_argmax/*` a gap of shares. The smooth ones use
the model's probability of the first prompt at its learnt temperature instead: RB
`rb_smooth`, AB `ab/*`. Both are always reported; the shares are the published numbers, the
probabilities do not jump when many near-identical images flip sides together.

Prompts: every group (man: man, male, gentleman; woman: woman, female, lady) and occupation
is a prompt SET, the CLIP ensemble of its synonyms × templates (`metrics.prompt_ensemble`, the
zero-shot evaluator's code); `default_evals_config` spells the sets out and `single_prompt`
falls back to one prompt per set.

Units: every RB and AB value (point, `_lo`, `_hi`; `rb`, `rb_smooth`, `ab/*`, `ab_mean`,
`ab_argmax/*`, `ab_argmax_mean`) is in points, 100 × a share or probability (`bias.POINTS`),
with no per-evaluator scale, so no two of them can disagree. Accuracies are fractions in
[0, 1]; MaxSkew and NDKL are in nats.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from siglip_fair.evaluate import bias, fairness, prompts
from siglip_fair.evaluate.base import (DEFAULT_OCCUPATION_PAIRS, Evaluator, labelled, mean_last,
                                       word_sets)


class RepresentationBias(Evaluator):
  """RB on object images (no person shown), in points, both readings in [−50, 50]; > 0 leans
  to contrast[0] (SPEC §3):

    rb: the paper's definition, 100 × (share of images more similar to contrast[0]'s prompt
      set than contrast[1]'s − 1/2) (`bias.prefers_first`; a tie counts half);
    rb_smooth: 100 × (mean over images of the model's probability of contrast[0], a softmax
      over the two sets' logits t · cosine at its temperature t − 1/2)
      (`bias.preference_probability`, the same reading as AB's `ab/*`).
  The share reports only on which side each image falls, so when many near-identical images
  (a synthetic world, one photo style) sit close to the boundary they flip together and RB
  jumps by tens of points between evaluations; the probability moves as much as the model's
  preference does, so curves and seed-to-seed comparisons read better on rb_smooth.

  Prompts: each group is the CLIP ensemble (`metrics.prompt_ensemble`) of its `group_words`
  synonyms in every `templates` entry; `single_prompt` keeps one prompt per group (first
  word, first template). Config: `group_words` (group -> synonyms), `contrast`, `templates`,
  `single_prompt`, `temperature` (None: the context's, the model's learnt one). Yields
  prefix + name and name + "_smooth", each with _lo/_hi (the same image resamples).
  """
  DEFAULTS = {"split": "objects", "group_words": prompts.DEFAULT_GROUP_WORDS,
              "contrast": ("man", "woman"), "templates": prompts.DEFAULT_TEMPLATES,
              "single_prompt": False, "temperature": None, "name": "rb", "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    words = self.config["group_words"]
    missing = [g for g in self.config["contrast"] if g not in words]
    if len(self.config["contrast"]) != 2 or missing:
      raise ValueError(f"contrast={self.config['contrast']} must name two "
                       f"groups of group_words {sorted(words)}.")
    self._check_temperature()
    self._prompts = self._encode_prompt_sets(
        {g: words[g] for g in self.config["contrast"]})

  def run(self, params):
    first, second = self._embed_prompt_sets(params, self._prompts)
    emb, _ = self._embed_split(params, [])
    prefer = np.stack([  # [N, 2]: the share's 1 / ½ / 0 and the probability, per image
        bias.prefers_first(emb, first, second),
        bias.preference_probability(emb, first, second, self._temperature(params))], -1)

    def stat(p):  # [B, N, 2] -> [B, 2]
      return bias.POINTS * bias.representation_bias(np.moveaxis(p, -1, -2))

    name = self.config["name"]
    yield from self._with_ci([name, name + "_smooth"], stat, prefer)


class AssociationBias(Evaluator):
  """AB in points per occupation pair: 100 × (P(first | contrast[0]) − P(first |
  contrast[1])) on people images, in [−100, 100], and the mean absolute gap (SPEC §3).

  Two readings of "the probability that the model prefers the first occupation", both
  reported as the gap between the groups in points:
    ab/<first>_<second>, ab_mean: the model's own probability of the first occupation
      (softmax over the two prompts at its temperature, `bias.preference_probability`),
      averaged per group;
    ab_argmax/<first>_<second>, ab_argmax_mean: the share of a group's images whose
      closer prompt is the first (`bias.prefers_first`).
  They agree on varied images; on near-identical ones the share only reports the sign of
  the model's group direction (a gap of 0 or ±100 points per pair) and the probability its
  size.

  Prompts: each occupation is the CLIP ensemble of its `label_words` synonyms in every
  `templates` entry (`single_prompt`: first word, first template only).

  Config: `group_key` (int field indexing `groups`), `contrast`, `pairs` ((first, second)
  names), `label_words` (optional name -> synonyms; default the name itself), `templates`,
  `single_prompt`, `temperature` (None: the context's, i.e. the model's learnt one). Every
  metric (points) comes with _lo/_hi; NaN (and a logged warning) when a contrasted group has
  no images.
  """
  DEFAULTS = {"split": "people", "group_key": "gender", "groups": ("man", "woman"),
              "contrast": ("woman", "man"), "pairs": DEFAULT_OCCUPATION_PAIRS,
              "label_words": {}, "templates": prompts.DEFAULT_TEMPLATES,
              "single_prompt": False, "temperature": None, "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    groups, contrast = list(self.config["groups"]), self.config["contrast"]
    if len(contrast) != 2 or any(g not in groups for g in contrast):
      raise ValueError(f"contrast={contrast} must name two of groups={groups} "
                       "(the order of the group field's indices).")
    self._contrast = tuple(groups.index(g) for g in contrast)
    self._pairs = [tuple(p) for p in self.config["pairs"]]
    if not self._pairs or any(len(p) != 2 for p in self._pairs):
      raise ValueError(f"pairs={self._pairs} must be (first, second) names.")
    self._check_temperature()
    names = list(dict.fromkeys(n for p in self._pairs for n in p))
    self._index = {n: i for i, n in enumerate(names)}
    words = self.config["label_words"]
    self._prompts = self._encode_prompt_sets({n: words.get(n, [n]) for n in names})

  def run(self, params):
    label_emb = self._embed_prompt_sets(params, self._prompts)
    emb, values = self._embed_split(params, [self.config["group_key"]])
    group = np.asarray(values[self.config["group_key"]], np.int64)
    for g, name in zip(self._contrast, self.config["contrast"]):
      if not np.any(group == g):
        logging.warning("AssociationBias: no %r images in split %r; AB is NaN.",
                        name, self.config["split"])
    first = label_emb[[self._index[a] for a, _ in self._pairs]]
    second = label_emb[[self._index[b] for _, b in self._pairs]]
    t = self._temperature(params)
    prefer = np.concatenate([bias.preference_probability(emb, first, second, t),
                             bias.prefers_first(emb, first, second)], -1)  # [N, 2P]
    num = len(self._pairs)

    def stat(p, g):
      gaps = bias.association_bias(p, g, *self._contrast)[0]
      prob, share = gaps[..., :num], gaps[..., num:]
      return bias.POINTS * np.concatenate([prob, np.abs(prob).mean(-1, keepdims=True),
                                     share, np.abs(share).mean(-1, keepdims=True)], -1)

    pairs = [f"{a}_{b}" for a, b in self._pairs]
    names = ([f"ab/{p}" for p in pairs] + ["ab_mean"]
             + [f"ab_argmax/{p}" for p in pairs] + ["ab_argmax_mean"])
    yield from self._with_ci(names, stat, prefer, group)


class AttributeAccuracy(Evaluator):
  """Zero-shot accuracy at recognising the sensitive attribute (gender).

  Config: `label_key` (int field indexing `groups`, -1 skipped), `groups`,
  `group_words`, `templates`, `single_prompt` (as RepresentationBias). Yields prefix + name
  with _lo/_hi.
  """
  DEFAULTS = {"split": "people", "label_key": "gender", "groups": ("man", "woman"),
              "group_words": prompts.DEFAULT_GROUP_WORDS,
              "templates": prompts.DEFAULT_TEMPLATES, "single_prompt": False,
              "name": "gender_acc", "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    words = self.config["group_words"]
    missing = [g for g in self.config["groups"] if g not in words]
    if missing:
      raise ValueError(f"groups {missing} have no entry in group_words "
                       f"{sorted(words)}.")
    self._prompts = self._encode_prompt_sets(
        {g: words[g] for g in self.config["groups"]})

  def run(self, params):
    group_emb = self._embed_prompt_sets(params, self._prompts)
    emb, values = self._embed_split(params, [self.config["label_key"]])
    labels = np.asarray(values[self.config["label_key"]], np.int64)
    keep = labelled(labels, self)
    correct = bias.attribute_correct(emb[keep], group_emb, labels[keep])
    yield from self._with_ci(self.config["name"], mean_last, correct)
    groups = self.config["groups"]
    per_group, worst, gap = fairness.group_accuracies(correct, labels[keep], len(groups))
    name = self.prefix + self.config["name"]
    for group, value in zip(groups, per_group):
      yield f"{name}/{group}", float(value)  # NaN for a group with no images
    yield f"{name}_worst", float(worst)
    yield f"{name}_gap", float(gap)


class RetrievalSkew(Evaluator):
  """Who a neutral text query retrieves: MaxSkew@k and NDKL@k of the sensitive groups among
  the top-k images (Geyik et al., 2019), averaged over the queries.

  Config: `queries` (words, e.g. occupations, each ensembled over `templates`), `ks` (required:
  the cut-offs are part of the metric), `group_key` (int field, -1 = unknown, left out),
  `target` (group shares; None = their shares in the split), `convention`: "exact" (default;
  a group absent from the top k never sets MaxSkew) or "debias_vision_lang" (its share is
  smoothed to 1/k, as Berg et al. 2022's code does; `fairness` module docstring). Yields
  prefix + maxskew@k ("exact") or maxskew_dvl@k (the smoothed quantity has its own name) and
  ndkl@k (the same under both), in nats, and their worst query (`_max`).
  """
  DEFAULTS = {"split": "people", "queries": None, "ks": None, "group_key": "gender",
              "templates": prompts.DEFAULT_TEMPLATES, "target": None, "convention": "exact",
              "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    if not self.config["queries"]:
      raise ValueError("RetrievalSkew needs `queries`: the neutral words whose retrievals "
                       "are measured (e.g. occupations).")
    ks = self.config["ks"]
    if not ks or any(int(k) < 1 for k in ks):
      raise ValueError(f"RetrievalSkew needs explicit `ks` >= 1 (e.g. (10, 100)), got {ks!r}; "
                       "MaxSkew and NDKL depend on k.")
    if self.config["convention"] not in fairness.SKEW_CONVENTIONS:
      raise ValueError(f"RetrievalSkew: convention={self.config['convention']!r}; use one of "
                       f"{fairness.SKEW_CONVENTIONS}.")
    self._prompts = self._encode_prompt_sets(word_sets(self.config["queries"]))

  def run(self, params):
    query_emb = self._embed_prompt_sets(params, self._prompts)
    emb, values = self._embed_split(params, [self.config["group_key"]])
    groups = np.asarray(values[self.config["group_key"]], np.int64)
    scores = query_emb @ emb.T
    target = self.config["target"]
    target = None if target is None else np.asarray(target, np.float64)
    convention = self.config["convention"]
    maxskew = "maxskew" if convention == "exact" else "maxskew_dvl"
    for k in self.config["ks"]:
      for name, fn in ((maxskew, fairness.maxskew_at_k), ("ndkl", fairness.ndkl_at_k)):
        per_query = fn(scores, groups, int(k), target=target, convention=convention)
        yield f"{self.prefix}{name}@{k}", float(np.mean(per_query))
        yield f"{self.prefix}{name}@{k}_max", float(np.max(per_query))
