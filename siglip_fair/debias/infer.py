"""Step 1 of CLIP-debias (SPEC §6.1): each image's similarity to attribute prompts.

A prompt set per attribute value ("a photo of a man", "a picture of a man", ...: templates x
phrases) is embedded and template-ensembled as in zero-shot classification; an image's
similarity vector holds its cosine similarity to each set. Clustering those vectors
(`cluster.kmeans`) gives the pseudo groups.

The two-tower model is any checkpoint the project can load (`load_two_tower`):
  kind='run': a workdir trained by this project (`config` is that run's config; when the
    workdir has no checkpoint and `train_if_missing`, it is trained there first, as a
    model that never saw the target task);
  kind='big_vision': a big_vision SigLIP/CLIP .npz plus its sentencepiece tokenizer (`eos` and
    `text_padding` as the checkpoint was trained: big_vision's are 'none' and 'none'), run at
    `image_size` (0: the checkpoint's; another needs `resize_posemb`);
  kind='released': a released big_vision .npz or Hugging Face folder (`path`) with its family's
    tokenizer rules and image preprocessing (models/released.py; `tokenizer`: an .npz's
    tokenizer file, `family` to force a preset, `image_size` / `resize_posemb` as above).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from siglip_fair.evaluate import metrics, prompts
from siglip_fair.evaluate.base import embed_fixed, preprocess_images

KINDS = ("run", "big_vision", "released")


@dataclasses.dataclass
class TwoTowerHandle:
  """What inference needs from a two-tower model."""
  embed_images: Callable  # (params, f32 [B, S, S, 3] in [-1, 1]) -> [B, D]
  embed_texts: Callable  # (params, i32 [B, L]) -> [B, D]
  params: Any
  tokenizer: Any  # encode(list[str]) -> i32 [P, L]
  image_size: int
  # uint8 [B, H, W, 3] -> f32 [B, S, S, 3] in [-1, 1] at the model's size (a released model's
  # preprocessing); None: centre crop and PIL bicubic resize to image_size (_resize).
  prepare: Callable[[np.ndarray], np.ndarray] | None = None


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  from siglip_fair.data.datasets import prepare_image
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([prepare_image(im, size) for im in images])


def attribute_embeddings(handle: TwoTowerHandle, attributes: Mapping[str, Sequence[str]],
                         templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """[A, D] unit embeddings, one per attribute value, ensembled over templates x phrases."""
  if len(attributes) < 2:
    raise ValueError(f"debias prompts need at least 2 attribute values, got {list(attributes)}.")
  texts, spans = prompts.prompt_sets(attributes, templates)
  tokens = np.asarray(handle.tokenizer.encode(texts))
  return metrics.prompt_ensemble(embed_fixed(handle.embed_texts, handle.params, tokens,
                                             batch_size), spans)


def image_embeddings(handle: TwoTowerHandle, images: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
  """[N, D] unit embeddings of uint8 images [N, H, W, 3] (resized to the model's size)."""
  out = []
  for lo in range(0, len(images), batch_size):
    chunk = images[lo:lo + batch_size]
    chunk = (handle.prepare(chunk) if handle.prepare is not None
             else preprocess_images(_resize(chunk, handle.image_size)))
    out.append(embed_fixed(handle.embed_images, handle.params, chunk, batch_size))
  return metrics.l2_normalize(np.concatenate(out))


def similarities(handle: TwoTowerHandle, images: np.ndarray,
                 attributes: Mapping[str, Sequence[str]], templates: Sequence[str],
                 batch_size: int = 256) -> np.ndarray:
  """float32 [N, A]: cosine similarity of each image to each attribute's prompt ensemble."""
  if not len(images):
    raise ValueError("no images to infer groups for.")
  text = attribute_embeddings(handle, attributes, templates, batch_size)
  return (image_embeddings(handle, images, batch_size) @ text.T).astype(np.float32)


def standardize(sims: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """Centres each similarity column on the reference rows' mean and scales by their std.

  Raw cosine similarities share a large offset and differ by a few hundredths between
  attributes; k-means on the raw vectors would weigh columns by their spread in arbitrary units.
  """
  ref = sims if reference is None else reference
  mean, std = ref.mean(0), ref.std(0)
  return ((sims - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def load_two_tower(cfg: ml_collections.ConfigDict, workdir: str,
                   log: Callable[[str], None] = print) -> TwoTowerHandle:
  """The two-tower model named by `cfg` (the debias config's `clip` block)."""
  from siglip_fair.models.two_tower import embed_fns, make_model
  if cfg.kind not in KINDS:
    raise ValueError(f"clip.kind={cfg.kind!r}; expected one of {KINDS}.")
  if cfg.kind == "big_vision":
    from siglip_fair.data.tokenizer import Tokenizer
    from siglip_fair.models import big_vision
    for key in ("npz", "tokenizer"):
      if not cfg.get(key) or not os.path.isfile(cfg[key]):
        raise FileNotFoundError(f"clip.{key}={cfg.get(key)!r} is not a file; clip.kind="
                                "'big_vision' needs the checkpoint .npz and its sentencepiece "
                                "model.")
    flat = big_vision.load_npz(cfg.npz)
    try:
      model_cfg = ml_collections.ConfigDict(big_vision.model_config(
          flat, text_padding=cfg.get("text_padding", "none")))
      # The checkpoint's own resolution unless clip.image_size asks for another, which then
      # needs its position grid resampled (clip.resize_posemb).
      size = int(cfg.get("image_size", 0)) or _checkpoint_size(flat)
      params = big_vision.from_big_vision(flat, image_size=size,
                                          resize_posemb=bool(cfg.get("resize_posemb", False)))
    except ValueError as e:  # name the file: the message itself only lists keys
      raise ValueError(f"clip.npz={cfg.npz!r}: {e}") from None
    model = make_model(model_cfg)
    tokenizer = Tokenizer(cfg.tokenizer, model_cfg.text.max_len, eos=cfg.get("eos", "none"))
    embed_images, embed_texts = embed_fns(model)
    return TwoTowerHandle(embed_images, embed_texts, params, tokenizer, size)
  if cfg.kind == "released":
    return _load_released(cfg)
  from siglip_fair import study
  from siglip_fair.train import checkpoint
  run_dir = cfg.get("workdir") or os.path.join(workdir, "clip")
  if checkpoint.latest_step(run_dir) is None:
    if not cfg.get("train_if_missing", True):
      raise FileNotFoundError(f"clip.workdir={run_dir!r} has no checkpoint; train one with "
                              "`python -m siglip_fair train` or set clip.train_if_missing=true.")
    log(f"debias: training the two-tower model in {run_dir} (it never sees the target task)")
    study.train_and_evaluate(cfg.config, run_dir)
  data = study.prepare_data(cfg.config, run_dir)
  embed_images, embed_texts = embed_fns(make_model(cfg.config.model))
  return TwoTowerHandle(embed_images, embed_texts, checkpoint.load_params(run_dir),
                        data.tokenizer, int(cfg.config.world.image_size))


def _checkpoint_size(flat) -> int:
  """The resolution (px) of a big_vision checkpoint's square position grid."""
  from siglip_fair.models import big_vision
  size = big_vision.image_size(flat)
  if size is None:
    raise ValueError("the checkpoint has no square learnt position grid to read its "
                     "resolution from; set clip.image_size.")
  return size


def _load_released(cfg) -> TwoTowerHandle:
  """clip.kind='released': a big_vision .npz or Hugging Face folder with its preset."""
  from siglip_fair.data import preprocess
  from siglip_fair.models import released
  from siglip_fair.models.two_tower import embed_fns, make_model
  path = cfg.get("path", "")
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"clip.path={path!r} does not exist; clip.kind='released' needs a "
                            "big_vision .npz or a Hugging Face folder.")
  size = int(cfg.get("image_size", 0))
  spec = released.resolve(path, family=cfg.get("family", ""),
                          tokenizer=dict(path=cfg.get("tokenizer") or None),
                          image=dict(size=size or None))
  params = released.load_params(spec, resize_posemb=bool(cfg.get("resize_posemb", False)))
  embed_images, embed_texts = embed_fns(make_model(ml_collections.ConfigDict(spec.model)))
  image_cfg = spec.preprocess.to_dict()
  return TwoTowerHandle(embed_images, embed_texts, params, released.make_tokenizer(spec),
                        int(image_cfg["size"]),
                        prepare=lambda images: preprocess.images_at(images, image_cfg))
