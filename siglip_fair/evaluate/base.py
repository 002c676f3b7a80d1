"""The evaluator protocol and what every evaluator shares.

big_vision style: each evaluator is built once from its sub-config and a shared `EvalContext`,
and `run(params)` yields `(name, value)` pairs. Metric math lives in `metrics` / `bias` /
`fairness` (pure functions on embeddings); evaluators only read data, batch and embed it.
Batches have a fixed size (the last one is zero-padded and the padding dropped from the
outputs), so jitted embedders compile once per tower.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from siglip_fair.data import pipeline
from siglip_fair.evaluate import metrics, prompts
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


def embed_fixed(fn: Embedder, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
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


def plain_config(x):
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


class Evaluator:
  """Base class: resolves the config against DEFAULTS and reads the split."""
  DEFAULTS: dict[str, Any] = {}

  def __init__(self, config: Mapping[str, Any], context: EvalContext):
    config = {k: plain_config(v) for k, v in dict(config).items() if k != "type"}
    allowed = {**self.DEFAULTS, "bootstrap": _BOOTSTRAP}
    unknown = sorted(set(config) - set(allowed))
    if unknown:
      raise ValueError(f"{type(self).__name__}: unknown config key(s) {unknown};"
                       f" allowed: {sorted(allowed)}.")
    self.config = {**allowed, **config}
    self.config["bootstrap"] = {**_BOOTSTRAP, **self.config["bootstrap"]}
    split = self.config["split"]
    if split not in context.sources:
      raise ValueError(f"{type(self).__name__} needs split {split!r}, which does not exist; "
                       f"set its `split` to one of {sorted(context.sources)} (real datasets "
                       "join them through config.eval_data).")
    if not len(context.sources[split]):
      # Found at build time, before training, rather than at the first evaluation.
      raise ValueError(f"{type(self).__name__} reads split {split!r}, which has no examples; "
                       "give it some (e.g. world.sizes or a non-empty eval_data split) or "
                       "drop the evaluator from config.evals.")
    if context.batch_size < 1:
      raise ValueError(f"batch_size={context.batch_size} must be >= 1.")
    self.context = context
    self.source = context.sources[split]
    self.prefix = self.config["prefix"]

  def _encode_prompt_sets(self, sets: Mapping[str, Sequence[str]]):
    """Tokens of every template × synonym prompt and each set's span of rows; with a
    `single_prompt` config key set, one prompt per set (its first word in the first
    template), the single-prompt reading the ensemble replaces."""
    templates = self.config["templates"]
    if self.config.get("single_prompt"):
      sets = {name: list(words)[:1] for name, words in sets.items()}
      templates = list(templates)[:1]
    texts, spans = prompts.prompt_sets(sets, templates)
    return self.context.tokenizer.encode(texts), spans

  def _check_temperature(self):
    """At build time: the evaluator's probabilities need the model's logit scale."""
    t = self.config["temperature"]
    if t is None and self.context.temperature is None:
      raise ValueError(f"{type(self).__name__} needs the model's temperature: give the "
                       "EvalContext a `temperature` function or set the evaluator's "
                       "`temperature`.")
    if t is not None and not float(t) > 0:
      raise ValueError(f"{type(self).__name__}: temperature={t!r} must be > 0.")

  def _temperature(self, params) -> float:
    """The config's fixed temperature, else the model's learnt one (`context.temperature`)."""
    t = self.config["temperature"]
    return float(self.context.temperature(params) if t is None else t)

  def _embed_prompts(self, params, encoded) -> np.ndarray:
    """[P, D] L2-normalised embeddings of every prompt of `_encode_prompt_sets` output."""
    tokens, _ = encoded
    return metrics.l2_normalize(np.asarray(embed_fixed(
        self.context.embed_texts, params, np.asarray(tokens), self.context.batch_size)))

  def _embed_prompt_sets(self, params, encoded) -> np.ndarray:
    """[S, D] template/synonym ensembles from `_encode_prompt_sets` output."""
    return metrics.prompt_ensemble(self._embed_prompts(params, encoded), encoded[1])

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


def mean_last(x: np.ndarray) -> np.ndarray:
  return x.mean(-1)


def word_sets(names_or_sets) -> dict[str, Sequence[str]]:
  """A list of names (each its own word) or a dict name -> synonyms."""
  if isinstance(names_or_sets, Mapping):
    return dict(names_or_sets)
  return {name: [name] for name in names_or_sets}


def labelled(labels: np.ndarray, evaluator: Evaluator) -> np.ndarray:
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f"{type(evaluator).__name__}: no image of split "
                     f"{evaluator.config['split']!r} has a label (all are -1).")
  return keep


