"""Evaluators: embed an eval split with the current params and yield metrics.

big_vision style: each evaluator is built once from its sub-config and a shared
`EvalContext`, and `run(params)` yields `(name, value)` pairs. Metric math
lives in `metrics` / `bias` (pure functions on embeddings); this module only
reads data, batches it and embeds it.

Batches have a fixed size (the last one is zero-padded and the padding is
dropped from the outputs), so jitted embedders compile once per tower.

Config (`config.evals`): name -> sub-config; `type` selects the class (it
defaults to the name), e.g.

    config.evals.zeroshot = dict(type="zeroshot", classes=["cat", "car"])
    config.evals.rb = dict(type="representation_bias")
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging

from siglip_fair.data import pipeline
from siglip_fair.evaluate import bias, fairness, metrics, prompts
from siglip_fair.evaluate.bootstrap import bootstrap_ci

Embedder = Callable[[Any, np.ndarray], Any]

# SPEC §3: first of each pair is the stereotypically female occupation.
DEFAULT_OCCUPATION_PAIRS = (
    ("librarian", "scientist"), ("nurse", "doctor"),
    ("housekeeper", "homeowner"), ("receptionist", "executive"),
    ("secretary", "manager"))
_BOOTSTRAP = {"num_samples": 1000, "alpha": 0.05, "seed": 0}


class Tokenizer(Protocol):
  def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every evaluator needs besides its config.

  Attributes:
    embed_images: (params, float32 [B, H, W, 3] in [-1, 1]) -> [B, D],
      L2-normalised (for the two-tower model: `models.two_tower.embed_fns`).
    embed_texts: (params, int32 [B, L]) -> [B, D], L2-normalised.
    tokenizer: `encode(list[str]) -> int32 [N, L]`.
    sources: split name -> random-access source of example dicts (`len`,
      `[i]`), e.g. the dict `tfds.data_source(...)` returns.
    batch_size: B, the fixed batch size of every embedder call.
    temperature: params -> the model's logit scale t (for the two-tower model:
      `models.two_tower.temperature`); needed by association bias's probabilities
      unless its config fixes one.
  """
  embed_images: Embedder
  embed_texts: Embedder
  tokenizer: Tokenizer
  sources: Mapping[str, Any]
  batch_size: int = 256
  temperature: Callable[[Any], float] | None = None


def preprocess_images(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1]."""
  return pipeline.normalize_image(images)


def _embed_fixed(fn: Embedder, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Embeds [N, ...] inputs in zero-padded batches of exactly batch_size."""
  out = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
    emb = np.asarray(fn(params, np.concatenate([chunk, pad])), np.float32)
    if emb.ndim != 2 or emb.shape[0] != batch_size:
      raise ValueError(f"An embedder returned shape {emb.shape} for a batch of "
                       f"{batch_size}; it must return [B, D].")
    out.append(emb[:len(chunk)])
  return np.concatenate(out)


def _plain(x):
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


class Evaluator:
  """Base class: resolves the config against DEFAULTS and reads the split."""
  DEFAULTS: dict[str, Any] = {}

  def __init__(self, config: Mapping[str, Any], context: EvalContext):
    config = {k: _plain(v) for k, v in dict(config).items() if k != "type"}
    allowed = {**self.DEFAULTS, "bootstrap": _BOOTSTRAP}
    unknown = sorted(set(config) - set(allowed))
    if unknown:
      raise ValueError(f"{type(self).__name__}: unknown config key(s) {unknown};"
                       f" allowed: {sorted(allowed)}.")
    self.config = {**allowed, **config}
    self.config["bootstrap"] = {**_BOOTSTRAP, **self.config["bootstrap"]}
    split = self.config["split"]
    if split not in context.sources:
      raise ValueError(f"{type(self).__name__} needs split {split!r}; the "
                       f"context has {sorted(context.sources)}.")
    if context.batch_size < 1:
      raise ValueError(f"batch_size={context.batch_size} must be >= 1.")
    self.context = context
    self.source = context.sources[split]
    self.prefix = self.config["prefix"]

  def _encode_prompt_sets(self, sets: Mapping[str, Sequence[str]]):
    texts, spans = prompts.prompt_sets(sets, self.config["templates"])
    return self.context.tokenizer.encode(texts), spans

  def _embed_prompt_sets(self, params, encoded) -> np.ndarray:
    """[S, D] template/synonym ensembles from `_encode_prompt_sets` output."""
    tokens, spans = encoded
    emb = _embed_fixed(self.context.embed_texts, params, np.asarray(tokens),
                       self.context.batch_size)
    return metrics.prompt_ensemble(emb, spans)

  def _embed_split(self, params, fields: Sequence[str]):
    """Image embeddings [N, D] and {field: list of N values} of the split, read through
    `pipeline.eval_batches` (fixed-size batches, the last one padded and masked)."""
    n, bs = len(self.source), self.context.batch_size
    if not n:
      raise ValueError(f"Split {self.config['split']!r} is empty.")
    missing = [f for f in ("image", *fields) if f not in self.source[0]]
    if missing:
      raise ValueError(f"Records of split {self.config['split']!r} have no "
                       f"field(s) {missing}; available: {sorted(self.source[0])}.")
    embs, values = [], {f: [] for f in fields}
    for batch in pipeline.eval_batches(self.source, batch_size=bs, fields=("image", *fields)):
      real = np.asarray(batch["mask"])
      emb = np.asarray(self.context.embed_images(params, batch["image"]), np.float32)
      if emb.ndim != 2 or emb.shape[0] != bs:
        raise ValueError(f"An embedder returned shape {emb.shape} for a batch of {bs}; it "
                         "must return [B, D].")
      embs.append(emb[real])
      for f in fields:
        values[f].extend(np.asarray(batch[f])[real])
    return np.concatenate(embs), values

  def _with_ci(self, names: str | Sequence[str], stat_fn,
               *arrays) -> Iterator[tuple[str, float]]:
    """Yields each name (point) and, unless bootstrap is off, name_lo/name_hi.

    `stat_fn` maps [B, n, ...] arrays to [B] (one name) or [B, len(names)].
    """
    cfg = self.config["bootstrap"]
    if cfg["num_samples"] == 0:
      results = [("", stat_fn(*(a[None] for a in arrays))[0])]
    else:
      point, lo, hi = bootstrap_ci(stat_fn, *arrays, seed=cfg["seed"],
                                   num_samples=cfg["num_samples"],
                                   alpha=cfg["alpha"])
      results = [("", point), ("_lo", lo), ("_hi", hi)]
    names = [names] if isinstance(names, str) else list(names)
    for i, name in enumerate(names):
      for suffix, value in results:
        yield self.prefix + name + suffix, float(np.reshape(value, -1)[i])

  def run(self, params) -> Iterator[tuple[str, float]]:
    raise NotImplementedError


def _mean_last(x: np.ndarray) -> np.ndarray:
  return x.mean(-1)


def _word_sets(names_or_sets) -> dict[str, Sequence[str]]:
  """A list of names (each its own word) or a dict name -> synonyms."""
  if isinstance(names_or_sets, Mapping):
    return dict(names_or_sets)
  return {name: [name] for name in names_or_sets}


def _labelled(labels: np.ndarray, evaluator: Evaluator) -> np.ndarray:
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f"{type(evaluator).__name__}: no image of split "
                     f"{evaluator.config['split']!r} has a label (all are -1).")
  return keep


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
    self._prompts = self._encode_prompt_sets(_word_sets(self.config["classes"]))

  def run(self, params):
    class_emb = self._embed_prompt_sets(params, self._prompts)
    emb, values = self._embed_split(params, [self.config["label_key"]])
    labels = np.asarray(values[self.config["label_key"]], np.int64)
    keep = _labelled(labels, self)
    ranks = metrics.zeroshot_ranks(emb[keep], class_emb, labels[keep],
                                   self.config["chunk_size"])
    for k in self.config["ks"]:
      yield from self._with_ci(f"top{k}", _mean_last, (ranks < k).astype(np.float32))
    if self.config["template_bootstrap"]:
      yield from self._template_intervals(params, emb[keep], labels[keep])

  def _template_intervals(self, params, emb, labels):
    tokens, spans = self._prompts
    prompt_emb = metrics.l2_normalize(np.asarray(_embed_fixed(
        self.context.embed_texts, params, np.asarray(tokens), self.context.batch_size)))
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
  """Image<->text Recall@k with all K captions of each image.

  Config: `caption_key` (bytes [K] per record), `ks`, `chunk_size` (queries
  scored at once). Yields prefix + i2t_r{k}, t2i_r{k}.
  """
  DEFAULTS = {"split": "retrieval", "caption_key": "captions",
              "ks": (1, 5, 10), "chunk_size": 1024, "prefix": "retrieval/"}

  def run(self, params):
    emb, values = self._embed_split(params, [self.config["caption_key"]])
    captions = [np.atleast_1d(c).tolist() for c in values[self.config["caption_key"]]]
    texts = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
             for caps in captions for c in caps]
    text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    text_emb = _embed_fixed(self.context.embed_texts, params,
                            np.asarray(self.context.tokenizer.encode(texts)),
                            self.context.batch_size)
    recalls = metrics.retrieval_recalls(emb, text_emb, text_image,
                                        self.config["ks"], self.config["chunk_size"])
    yield from ((self.prefix + k, v) for k, v in recalls.items())


class RepresentationBias(Evaluator):
  """RB x scale: share of object images closer to contrast[0] than contrast[1]
  group prompts, minus one half.

  Config: `group_words` (group -> synonyms), `contrast`, `templates`, `scale`
  (100 = percentage points). Yields prefix + name with _lo/_hi.
  """
  DEFAULTS = {"split": "objects", "group_words": prompts.DEFAULT_GROUP_WORDS,
              "contrast": ("man", "woman"), "templates": prompts.DEFAULT_TEMPLATES,
              "scale": 100.0, "name": "rb", "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    words = self.config["group_words"]
    missing = [g for g in self.config["contrast"] if g not in words]
    if len(self.config["contrast"]) != 2 or missing:
      raise ValueError(f"contrast={self.config['contrast']} must name two "
                       f"groups of group_words {sorted(words)}.")
    self._prompts = self._encode_prompt_sets(
        {g: words[g] for g in self.config["contrast"]})

  def run(self, params):
    first, second = self._embed_prompt_sets(params, self._prompts)
    emb, _ = self._embed_split(params, [])
    scale = self.config["scale"]
    yield from self._with_ci(self.config["name"],
                             lambda p: scale * bias.representation_bias(p),
                             bias.prefers_first(emb, first, second))


class AssociationBias(Evaluator):
  """AB x scale per occupation pair: P(first | contrast[0]) - P(first | contrast[1]) on
  people images, and the mean absolute gap (SPEC §3).

  Two readings of "the probability that the model prefers the first occupation":
    ab/<first>_<second>, ab_mean: the model's own probability of the first occupation
      (softmax over the two prompts at its temperature, `bias.preference_probability`),
      averaged per group;
    ab_argmax/<first>_<second>, ab_argmax_mean: the share of a group's images whose
      closer prompt is the first (`bias.prefers_first`).
  They agree on varied images; on near-identical ones the share only reports the sign of
  the model's group direction (0 or 100 per pair) and the probability its size.

  Config: `group_key` (int field indexing `groups`), `contrast`, `pairs` ((first, second)
  names), `label_words` (optional name -> synonyms; default the name itself), `templates`,
  `temperature` (None: the context's, i.e. the model's learnt one), `scale`. Every metric
  comes with _lo/_hi; NaN (and a logged warning) when a contrasted group has no images.
  """
  DEFAULTS = {"split": "people", "group_key": "gender", "groups": ("man", "woman"),
              "contrast": ("woman", "man"), "pairs": DEFAULT_OCCUPATION_PAIRS,
              "label_words": {}, "templates": prompts.DEFAULT_TEMPLATES,
              "temperature": None, "scale": 100.0, "prefix": "bias/"}

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
    if self.config["temperature"] is None and context.temperature is None:
      raise ValueError("AssociationBias needs the model's temperature: give the EvalContext "
                       "a `temperature` function or set the evaluator's `temperature`.")
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
    t = self.config["temperature"]
    t = float(self.context.temperature(params) if t is None else t)
    prefer = np.concatenate([bias.preference_probability(emb, first, second, t),
                             bias.prefers_first(emb, first, second)], -1)  # [N, 2P]
    scale, num = self.config["scale"], len(self._pairs)

    def stat(p, g):
      gaps = bias.association_bias(p, g, *self._contrast)[0]
      prob, share = gaps[..., :num], gaps[..., num:]
      return scale * np.concatenate([prob, np.abs(prob).mean(-1, keepdims=True),
                                     share, np.abs(share).mean(-1, keepdims=True)], -1)

    pairs = [f"{a}_{b}" for a, b in self._pairs]
    names = ([f"ab/{p}" for p in pairs] + ["ab_mean"]
             + [f"ab_argmax/{p}" for p in pairs] + ["ab_argmax_mean"])
    yield from self._with_ci(names, stat, prefer, group)


class AttributeAccuracy(Evaluator):
  """Zero-shot accuracy at recognising the sensitive attribute (gender).

  Config: `label_key` (int field indexing `groups`, -1 skipped), `groups`,
  `group_words`, `templates`. Yields prefix + name with _lo/_hi.
  """
  DEFAULTS = {"split": "people", "label_key": "gender", "groups": ("man", "woman"),
              "group_words": prompts.DEFAULT_GROUP_WORDS,
              "templates": prompts.DEFAULT_TEMPLATES, "name": "gender_acc",
              "prefix": "bias/"}

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
    keep = _labelled(labels, self)
    correct = bias.attribute_correct(emb[keep], group_emb, labels[keep])
    yield from self._with_ci(self.config["name"], _mean_last, correct)
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
  `target` (group shares; None = their shares in the split). Yields prefix + maxskew@k and
  ndkl@k, and their worst query (`_max`).
  """
  DEFAULTS = {"split": "people", "queries": None, "ks": None, "group_key": "gender",
              "templates": prompts.DEFAULT_TEMPLATES, "target": None, "prefix": "bias/"}

  def __init__(self, config, context):
    super().__init__(config, context)
    if not self.config["queries"]:
      raise ValueError("RetrievalSkew needs `queries`: the neutral words whose retrievals "
                       "are measured (e.g. occupations).")
    ks = self.config["ks"]
    if not ks or any(int(k) < 1 for k in ks):
      raise ValueError(f"RetrievalSkew needs explicit `ks` >= 1 (e.g. (10, 100)), got {ks!r}; "
                       "MaxSkew and NDKL depend on k.")
    self._prompts = self._encode_prompt_sets(_word_sets(self.config["queries"]))

  def run(self, params):
    query_emb = self._embed_prompt_sets(params, self._prompts)
    emb, values = self._embed_split(params, [self.config["group_key"]])
    groups = np.asarray(values[self.config["group_key"]], np.int64)
    scores = query_emb @ emb.T
    target = self.config["target"]
    target = None if target is None else np.asarray(target, np.float64)
    for k in self.config["ks"]:
      for name, fn in (("maxskew", fairness.maxskew_at_k), ("ndkl", fairness.ndkl_at_k)):
        per_query = fn(scores, groups, int(k), target=target)
        yield f"{self.prefix}{name}@{k}", float(np.mean(per_query))
        yield f"{self.prefix}{name}@{k}_max", float(np.max(per_query))


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
                         num_bootstrap: int = 1000) -> ml_collections.ConfigDict:
  """The study's five evaluators.

  Args:
    object_classes: class names in `object_label` order (world.OBJECT_CLASSES).
    occupation_pairs: (first, second) occupation NAMES, first stereotypically
      female (the world's OCCUPATION_PAIRS hold indices into OCCUPATIONS).
    groups: group names in the order of the `gender` field (world.GROUPS).
    num_bootstrap: bootstrap replicates per interval (0 = no intervals).
  """
  return ml_collections.ConfigDict({
      "zeroshot": {"type": "zeroshot", "classes": list(object_classes),
                   "bootstrap": {"num_samples": num_bootstrap}},
      "retrieval": {"type": "retrieval"},
      "rb": {"type": "representation_bias", "bootstrap": {"num_samples": num_bootstrap}},
      "ab": {"type": "association_bias", "groups": list(groups),
             "pairs": [list(p) for p in occupation_pairs],
             "bootstrap": {"num_samples": num_bootstrap}},
      "gender_acc": {"type": "attribute_accuracy", "groups": list(groups),
                     "bootstrap": {"num_samples": num_bootstrap}},
  })


def build_evaluators(config: Mapping[str, Any], context: EvalContext) -> dict[str, Evaluator]:
  """Builds one evaluator per entry of `config` (usually `config.evals`)."""
  evaluators = {}
  for name, sub in dict(config).items():
    kind = sub.get("type", name)
    if kind not in EVALUATORS:
      raise ValueError(f"Evaluator {name!r} has type {kind!r}; known types: "
                       f"{sorted(EVALUATORS)}.")
    evaluators[name] = EVALUATORS[kind](sub, context)
  return evaluators


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
