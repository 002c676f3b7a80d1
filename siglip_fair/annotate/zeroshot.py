"""Image-side attribute annotation by zero-shot inference (SPEC §1).

The model's own towers annotate images that captions leave unannotated: each
image embedding is compared with template-ensembled prompt embeddings of the
groups, occupations (labels) and proxies. Output follows the annotation
contract of `siglip_fair.annotate` (s [N, m], known [N], y [N, c], w [N, p],
u [N], all float32) so it plugs into `combine(text_ann, image_ann, rule)` or
`annotate_split(..., image_ann=...)`.

Inference rules (image embedding x, prompt-set embeddings e_k, cosine sims):
  s: one-hot of argmax_g p_g with p = softmax(t * sims to the group sets).
     known = 1 iff p_top1 - p_top2 > min_margin; rows of s are zero where
     known is 0 (so a tie is always unknown).
  y: one-hot of the argmax over the label sets (every image gets exactly one
     occupation; there is no "none" option).
  w: proxy j present iff sim_j - mean_k sim_k > proxy_threshold, i.e. by
     default any proxy more similar than the image's average proxy.
Fields not in `cfg.fields` come back as zeros (and known = 0 without "s").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from siglip_fair.annotate.combine import FIELDS, precision_recall
from siglip_fair.data import world
from siglip_fair.evaluate import metrics, prompts
from siglip_fair.evaluate.base import embed_fixed, preprocess_images


def default_config() -> ml_collections.ConfigDict:
  """Zero-shot annotation config.

  templates: prompt templates with one "{}".
  group_words: group name -> synonyms; keys give the columns of s, in order.
  label_words / proxy_words: name -> synonyms overriding the world's
    OCCUPATIONS / PROXIES names (a name missing here is its own word); the
    columns of y / w are always the world's names, in order.
  fields: which of ("s", "y", "w") to infer.
  min_margin: a group is known only where p_top1 - p_top2 exceeds it.
  proxy_threshold: cosine margin over the image's mean proxy similarity.
  batch_size: fixed row count of every embedder call.
  """
  cfg = ml_collections.ConfigDict()
  cfg.templates = tuple(prompts.DEFAULT_TEMPLATES)
  cfg.group_words = {k: list(v) for k, v in prompts.DEFAULT_GROUP_WORDS.items()}
  cfg.label_words = {}
  cfg.proxy_words = {}
  cfg.fields = ("s",)
  cfg.min_margin = 0.0
  cfg.proxy_threshold = 0.0
  cfg.batch_size = 256
  # With a released `checkpoint` (a big_vision .npz or Hugging Face folder), the sentencepiece
  # model or tokenizer.json of an .npz (a folder carries its own); '' otherwise.
  cfg.tokenizer = ""
  return cfg


def _plain(x):
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else dict(x)


def _fields(cfg) -> tuple[str, ...]:
  fields = (cfg.fields,) if isinstance(cfg.fields, str) else tuple(cfg.fields)
  unknown = [f for f in fields if f not in FIELDS]
  if unknown or not fields:
    raise ValueError(f"zeroshot fields={list(fields)} has unknown field(s) "
                     f"{unknown}; expected a non-empty subset of {FIELDS}.")
  return fields


def prompt_word_sets(cfg) -> dict[str, dict[str, list[str]]]:
  """field -> {column name: synonyms}, in column order, for s, y and w."""
  groups = _plain(cfg.group_words)
  if len(groups) < 2:
    raise ValueError(f"zeroshot group_words needs at least 2 groups, got "
                     f"{list(groups)}.")
  out = {"s": {k: list(v) for k, v in groups.items()}}
  for field, key, names in (("y", "label_words", world.OCCUPATIONS),
                            ("w", "proxy_words", world.PROXIES)):
    words = _plain(cfg[key])
    extra = sorted(set(words) - set(names))
    if extra:
      raise ValueError(f"zeroshot {key} has unknown name(s) {extra}; expected "
                       f"names from {names}.")
    out[field] = {n: list(words.get(n, [n])) for n in names}
  return out


def _check_temperature(temperature) -> float:
  t = float(temperature)
  if not np.isfinite(t) or t <= 0:
    raise ValueError(f"temperature must be a finite number > 0, got {t}.")
  return t


def group_scores(image_emb: np.ndarray, group_emb: np.ndarray,
                 temperature: float) -> np.ndarray:
  """Group probabilities softmax(t * cos(x, e_g)).

  Args:
    image_emb: [N, D]; group_emb: [G, D] (normalised here, so need not be).
    temperature: the logit scale t > 0.

  Returns:
    float32 [N, G], rows summing to 1.
  """
  t = _check_temperature(temperature)
  x = metrics.l2_normalize(metrics._check_embeddings("image_emb", image_emb))
  g = metrics.l2_normalize(
      metrics._check_embeddings("group_emb", group_emb, x.shape[1]))
  logits = t * (x.astype(np.float64) @ g.T.astype(np.float64))
  logits -= logits.max(axis=1, keepdims=True)  # for a stable exp
  p = np.exp(logits)
  return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def infer_attributes(image_emb: np.ndarray,
                     prompt_embs: Mapping[str, np.ndarray],
                     temperature: float,
                     cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Annotations from embeddings by the rules in the module docstring.

  Args:
    image_emb: [N, D] image embeddings.
    prompt_embs: field -> [K, D] prompt-set embeddings for each field in
      cfg.fields (K = m, c or p columns, in `prompt_word_sets` order).
    temperature: logit scale t > 0 (used for s).
    cfg: see `default_config`.

  Returns:
    s [N, m], known [N], y [N, c], w [N, p], u [N] zeros, all float32.
  """
  _check_temperature(temperature)
  fields, sets = _fields(cfg), prompt_word_sets(cfg)
  x = metrics.l2_normalize(metrics._check_embeddings("image_emb", image_emb))
  n = len(x)
  out = {f: np.zeros((n, len(sets[f])), np.float32) for f in FIELDS}
  out["known"] = np.zeros(n, np.float32)
  out["u"] = np.zeros(n, np.float32)
  for f in fields:
    if f not in prompt_embs:
      raise ValueError(f"prompt_embs lacks field {f!r} listed in cfg.fields.")
    e = metrics._check_embeddings(f"prompt_embs[{f!r}]", prompt_embs[f],
                                  x.shape[1])
    if len(e) != len(sets[f]):
      raise ValueError(f"prompt_embs[{f!r}] has {len(e)} rows; the config "
                       f"names {len(sets[f])} columns for {f!r}.")
    if f == "s":
      p = group_scores(x, e, temperature)
      top2 = np.sort(p, axis=1)[:, -2:]
      known = (top2[:, 1] - top2[:, 0] > cfg.min_margin).astype(np.float32)
      out["known"] = known
      out["s"] = np.eye(len(e), dtype=np.float32)[p.argmax(1)] * known[:, None]
      continue
    sims = x @ metrics.l2_normalize(e).T
    if f == "y":
      out["y"] = np.eye(len(e), dtype=np.float32)[sims.argmax(1)]
    else:
      centred = sims - sims.mean(axis=1, keepdims=True)
      out["w"] = (centred > cfg.proxy_threshold).astype(np.float32)
  return out


class ZeroShotAnnotator:
  """Annotates a random-access image source with a two-tower model.

  Args:
    embed_images: (params, float32 [B, H, W, 3] in [-1, 1]) -> [B, D].
    embed_texts: (params, int32 [B, L]) -> [B, D].
    tokenizer: `encode(list[str]) -> int32 [P, L]`.
    temperature_fn: params -> logit scale t (`models.two_tower.temperature`).
    cfg: see `default_config` (defaults when None).
    prepare: uint8 images [B, H, W, 3] -> float32 [B, S, S, 3] in [-1, 1] at the model's
      resolution (a released model's preprocessing: data/preprocess.images_at); default: the
      source's images as they are, scaled to [-1, 1].
  """

  def __init__(self, embed_images: Callable, embed_texts: Callable,
               tokenizer: Any, temperature_fn: Callable[[Any], float],
               cfg: ml_collections.ConfigDict | None = None,
               prepare: Callable[[np.ndarray], np.ndarray] = preprocess_images):
    self.cfg = default_config() if cfg is None else cfg
    self.prepare = prepare
    if int(self.cfg.batch_size) < 1:
      raise ValueError(f"zeroshot batch_size={self.cfg.batch_size} must be "
                       ">= 1.")
    self.fields = _fields(self.cfg)
    self.sets = prompt_word_sets(self.cfg)
    self.embed_images, self.embed_texts = embed_images, embed_texts
    self.temperature_fn = temperature_fn
    # Tokenised once: prompts do not depend on params.
    self.tokens = {}
    for f in self.fields:
      texts, spans = prompts.prompt_sets(self.sets[f], self.cfg.templates)
      self.tokens[f] = (np.asarray(tokenizer.encode(texts)), spans)

  def prompt_embeddings(self, params) -> dict[str, np.ndarray]:
    """field -> [K, D] template/synonym-ensembled prompt-set embeddings."""
    bs = int(self.cfg.batch_size)
    return {f: metrics.prompt_ensemble(
        embed_fixed(self.embed_texts, params, tokens, bs), spans)
            for f, (tokens, spans) in self.tokens.items()}

  def image_embeddings(self, params, source) -> np.ndarray:
    """[N, D] embeddings of source[i]['image'] (uint8 [H, W, 3])."""
    n, bs = len(source), int(self.cfg.batch_size)
    if not n:
      raise ValueError("The image source is empty; nothing to annotate.")
    if "image" not in source[0]:
      raise ValueError(f"Source records have no 'image' field; available: "
                       f"{sorted(source[0])}.")
    embs = []
    for start in range(0, n, bs):
      images = np.stack([source[i]["image"]
                         for i in range(start, min(start + bs, n))])
      embs.append(embed_fixed(self.embed_images, params, self.prepare(images), bs))
    return np.concatenate(embs)

  def annotate(self, params, source) -> dict[str, np.ndarray]:
    """Annotation dict (s, known, y, w, u) for every record of source."""
    t = self.temperature_fn(params)
    return infer_attributes(self.image_embeddings(params, source),
                            self.prompt_embeddings(params), t, self.cfg)


def is_released(path: str) -> bool:
  """Whether `path` names a released checkpoint (a big_vision .npz or a Hugging Face folder)
  rather than a training run's workdir."""
  import os  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.released import is_hf_folder  # pylint: disable=g-import-not-at-top
  return (os.path.isfile(path) and path.endswith(".npz")) or is_hf_folder(path)


def load_annotator(cfg, model_config, tokenizer) -> tuple[ZeroShotAnnotator, Any]:
  """(annotator, params) of the two-tower model in `cfg.checkpoint` (annotate.zeroshot): a
  training run's workdir, used with the run's `model_config` and `tokenizer` (the training
  data's), or a released checkpoint (`is_released`), used with its own model config,
  tokenizer and image preprocessing (models/released.py; an .npz's tokenizer file is
  `cfg.tokenizer`). Images of any size are resized to the model's."""
  # pylint: disable=g-import-not-at-top
  from siglip_fair.data import preprocess
  from siglip_fair.models import released
  from siglip_fair.models.two_tower import embed_fns, make_model, temperature
  # pylint: enable=g-import-not-at-top
  path = cfg.checkpoint
  if not path:
    raise ValueError("annotate.image='zeroshot' needs annotate.zeroshot.checkpoint: the workdir "
                     "of a trained two-tower run (e.g. a baseline run), a big_vision .npz or a "
                     "Hugging Face folder.")
  if is_released(path):
    spec = released.resolve(path, tokenizer=dict(path=cfg.get("tokenizer") or None))
    tokenizer = released.make_tokenizer(spec)
    params = released.load_params(spec)
    model = make_model(ml_collections.ConfigDict(spec.model))
    image_cfg = spec.preprocess.to_dict()
    prepare = lambda images: preprocess.images_at(images, image_cfg)  # noqa: E731
  else:
    from siglip_fair.train.checkpoint import load_params  # pylint: disable=g-import-not-at-top
    params, model, prepare = load_params(path), make_model(model_config), preprocess_images
  embed_images, embed_texts = embed_fns(model)
  return ZeroShotAnnotator(embed_images, embed_texts, tokenizer, temperature, cfg,
                           prepare=prepare), params


def agreement(image_ann: Mapping[str, np.ndarray],
              truth: Mapping[str, np.ndarray],
              names: Mapping[str, Sequence[str]] | None = None
              ) -> dict[str, float]:
  """Quality of image-side annotations against ground truth.

  Returns `combine.precision_recall` plus 's/accuracy' (exact group match on
  rows both sides mark known; NaN if none) and 'coverage' (mean predicted
  known).
  """
  out = precision_recall(image_ann, truth, names)
  pk = np.asarray(image_ann["known"]) > 0
  both = pk & (np.asarray(truth["known"]) > 0)
  match = np.all((np.asarray(image_ann["s"]) > 0) ==
                 (np.asarray(truth["s"]) > 0), axis=1)
  out["s/accuracy"] = float(match[both].mean()) if both.any() else float("nan")
  out["coverage"] = float(pk.mean()) if pk.size else float("nan")
  return out
