"""Released two-tower checkpoints with their preprocessing: big_vision `.npz` or Hugging Face
folders in, our config (model, tokenizer, image preprocessing) and params out.

  spec = resolve("siglip-base-patch16-224")       # reads config files / shapes, no weights
  spec.model, spec.tokenizer, spec.preprocess      # config.model, config.tokenizer, image rules
  params = load_params(spec)                       # our TwoTower params (numpy float32)
  tok = make_tokenizer(spec.tokenizer)             # data/tokenizer.py

`resolve` picks the preprocessing preset of the checkpoint's family (data/preprocess.py):
big_vision SigLIP ('siglip') or SigLIP 2 ('siglip2': the 256k Gemma vocabulary), transformers
SiglipModel ('siglip_hf', or 'siglip2_hf' with a Gemma tokenizer.json) or CLIPModel ('clip').
A transformers folder's preprocessor_config.json overrides the preset's image fields, and
`overrides` (config blocks whose None fields mean "the preset's") override everything. The
model config takes images in [-1, 1] like every model here: a preset's pixel mean / std other
than 0.5 (CLIP's) become model.image.pixel_mean / pixel_std, which the ViT applies itself.
"""
from __future__ import annotations

import functools
import json
import os

import ml_collections
import numpy as np

from siglip_fair.data import preprocess
from siglip_fair.models import big_vision, hf, trees
from siglip_fair.models import posemb as posemb_lib
from siglip_fair.models.posemb import square_grid

SOURCES = ("big_vision", "hf")
FAMILIES = tuple(preprocess.PRESETS)
_GEMMA_VOCAB = 256_000  # SigLIP 2's vocabulary (Gemma's tokenizer); SigLIP's are 32k / 250k


def is_hf_folder(path: str) -> bool:
  """A transformers checkpoint folder: config.json and safetensors weights (a training run's
  workdir also has a config.json, but checkpoints/ instead)."""
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and any(
      os.path.exists(os.path.join(path, f))
      for f in ("model.safetensors", "model.safetensors.index.json"))


def detect_source(path: str) -> str:
  """'big_vision' for an .npz file, 'hf' for a transformers folder; raises otherwise."""
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".npz"):
    return "big_vision"
  if is_hf_folder(path):
    return "hf"
  what = ("does not exist" if not os.path.exists(path) else
          "is a folder without config.json and model.safetensors" if os.path.isdir(path)
          else "is not an .npz file")
  raise ValueError(f"released checkpoint {path!r} {what}; pass a big_vision .npz or a Hugging "
                   "Face folder (config.json + model.safetensors).")


_TOKENIZER_FILES = {"hf": "tokenizer.json", "sentencepiece": "spiece.model"}


def _hf_tokenizer_file(path: str, kind: str) -> tuple[str, str]:
  """(kind, file) of a transformers folder's tokenizer: the file of `kind` when the folder has
  it, else the other one, else ('', '')."""
  for k in sorted(_TOKENIZER_FILES, key=lambda k: k != kind):
    file = os.path.join(path, _TOKENIZER_FILES[k])
    if os.path.exists(file):
      return k, file
  return "", ""


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@functools.lru_cache(maxsize=1)
def _npz(path: str, mtime: float) -> dict[str, np.ndarray]:
  # resolve, load_params and a model's init (traced twice) read the same file in a row; one
  # file is kept. mtime is part of the key only: a rewritten file is read again.
  del mtime
  return big_vision.load_npz(path)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  return _npz(os.path.abspath(path), os.path.getmtime(path))


def _merge(block: ml_collections.ConfigDict, overrides) -> None:
  """Sets every non-None field of `overrides` (a mapping) in `block`, refusing unknown ones."""
  for key, value in dict(overrides or {}).items():
    if value is None:
      continue
    if key not in block:
      raise ValueError(f"unknown field {key!r}; the fields are {sorted(block)}.")
    block[key] = tuple(value) if isinstance(value, list) else value


def resolve(path: str, *, source: str = "", family: str = "", tokenizer=None, image=None,
            scan=False) -> ml_collections.ConfigDict:
  """The config of a released checkpoint: ConfigDict(released=dict(source, path, family,
  image_size), model=config.model, tokenizer=config.tokenizer fields, preprocess=image fields).

  source: '' (from the path), 'big_vision' or 'hf'. family: '' (from the checkpoint) or a
  preset name (FAMILIES). tokenizer / image: overrides of the preset's text / image fields
  (mappings; None values are ignored). scan: the block layout our model runs (as in
  from_big_vision / load_hf). Only config files are read from a folder (an .npz is read whole:
  the model config comes from its arrays' shapes and t / b).
  """
  path = os.fspath(path)
  source = source or detect_source(path)
  if source not in SOURCES:
    raise ValueError(f"released.source={source!r}; use one of {SOURCES} (or '' to detect it).")
  if source == "big_vision":
    flat = _load_npz(path)
    model = big_vision.model_config(flat, scan=scan)
    image_size = big_vision.image_size(flat) or 0
    found = "siglip2" if model["text"]["vocab_size"] == _GEMMA_VOCAB else "siglip"
    processor = None
  else:
    config = hf.read_config(path)
    model = hf.model_config(config, scan=scan)
    image_size = int(hf._towers(config)[1]["image_size"])  # pylint: disable=protected-access
    if config["model_type"] == "clip":
      found = "clip"
    else:
      found = "siglip2_hf" if model["text"]["vocab_size"] == _GEMMA_VOCAB else "siglip_hf"
    processor = _read_json(os.path.join(path, "preprocessor_config.json"))
  family = family or found
  if family not in FAMILIES:
    raise ValueError(f"released.family={family!r}; use one of {FAMILIES} (or '' for the "
                     "checkpoint's own).")
  rules = preprocess.preset(family)
  overrides, image, text = image, rules.image, rules.text
  image.size = image_size
  if processor:
    preprocess.apply_hf_processor(image, processor)
  # A folder's own tokenizer file; its kind wins over the preset's (a SigLIP folder saved with
  # a tokenizer.json only). big_vision files carry none: tokenizer.path must name it.
  kind, text.path = _hf_tokenizer_file(path, text.kind) if source == "hf" else ("", "")
  text.kind = kind or text.kind
  _merge(image, overrides)
  _merge(text, tokenizer)
  preprocess.check_image_config(image)
  text.max_len = int(text.max_len) or int(model["text"]["max_len"])
  text.vocab_size = int(model["text"]["vocab_size"])
  affine = preprocess.unit_range_affine(image.mean, image.std)
  if affine is not None:
    model["image"].update(pixel_mean=tuple(image.mean), pixel_std=tuple(image.std))
  return ml_collections.ConfigDict(dict(
      released=dict(source=source, path=path, family=family, image_size=image_size),
      model=model, tokenizer=text.to_dict(), preprocess=image.to_dict()))


def check_tokenizer(spec, tokenizer) -> None:
  """Raises when `tokenizer` cannot feed the checkpoint's text tower: ids past its embedding
  table would be silently clamped by the lookup, rows longer than its positions have none."""
  rows, positions = int(spec.model.text.vocab_size), int(spec.model.text.max_len)
  if int(tokenizer.vocab_size) > rows:
    raise ValueError(f"the tokenizer {getattr(tokenizer, 'model_path', '')!r} has "
                     f"{tokenizer.vocab_size} tokens but the checkpoint's text embedding has "
                     f"{rows} rows; ids >= {rows} have no embedding. Use the tokenizer the "
                     "checkpoint was trained with (tokenizer.path).")
  if int(tokenizer.max_len) > positions:
    raise ValueError(f"tokenizer.max_len={tokenizer.max_len} but the checkpoint's text tower "
                     f"has {positions} positions; use max_len <= {positions}.")


def make_tokenizer(spec):
  """The checkpoint's tokenizer under its preset (spec from `resolve`), checked against the
  text tower (check_tokenizer)."""
  from siglip_fair.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if not spec.tokenizer.path:
    raise ValueError(f"{spec.released.path!r} carries no tokenizer (big_vision .npz files never "
                     "do); set tokenizer.path to the sentencepiece model it was trained with "
                     "(SigLIP: c4_en / mc4, SigLIP 2: gemma) or a tokenizer.json.")
  tokenizer = tokenizer_lib.make_tokenizer(spec.tokenizer)
  check_tokenizer(spec, tokenizer)
  return tokenizer


def load_params(spec, *, image_size: int | None = None, resize_posemb: bool = False,
                posemb_method: str = "zoom") -> dict:
  """Our params (numpy float32) of a resolved checkpoint, at `image_size` px (default: the
  preprocessing's size). A patch grid other than the checkpoint's needs resize_posemb=True
  (big_vision's high-res fine-tuning: posemb.resize_posemb), else the error names both."""
  path, source = spec.released.path, spec.released.source
  size = int(image_size or spec.preprocess.size or spec.released.image_size)
  scan = (bool(spec.model.image.get("scan", False)), bool(spec.model.text.get("scan", False)))
  if source == "big_vision":
    try:
      return big_vision.from_big_vision(_load_npz(path), scan=scan, image_size=size,
                                        resize_posemb=resize_posemb, posemb_method=posemb_method)
    except ValueError as e:
      raise ValueError(f"{path!r}: {e}") from None
  params = hf.load_hf(path, scan=scan).params
  posemb = params["img"]["pos_embedding"]
  cls = int(bool(spec.model.image.get("cls_posemb", False)))
  patch = int(spec.model.image.variant.split("/")[1])
  if size % patch:
    raise ValueError(f"image size {size} is not a multiple of the checkpoint's patch {patch}.")
  grid = size // patch
  have = square_grid(posemb.shape[1] - cls)
  if have != grid:
    if not resize_posemb:
      raise ValueError(
          f"{path!r} has a {have}x{have} patch grid ({have * patch} px at patch {patch}), but "
          f"{size} px images need {grid}x{grid}; set released.resize_posemb=true to resample "
          "it or use the checkpoint's resolution.")
    grid_rows = posemb_lib.resize_posemb(posemb[:, cls:], (grid, grid), posemb_method)
    params["img"]["pos_embedding"] = np.concatenate([posemb[:, :cls], grid_rows], axis=1)
  return params


_flat = trees.flatten


def init_params(path: str, template, *, image_size: int, resize_posemb: bool = False) -> dict:
  """Params of the checkpoint at `path` (a big_vision .npz or Hugging Face folder) for a model
  whose freshly initialised params are `template` (a tree of arrays or shapes), at
  `image_size` px: used by `model.init_from` to fine-tune a released model. Raises naming every
  key or shape where the checkpoint and config.model differ."""
  spec = resolve(path, scan=_scans(template))
  params = load_params(spec, image_size=image_size, resize_posemb=resize_posemb)
  want = {k: tuple(np.shape(v)) for k, v in _flat(template).items()}
  have = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = sorted(f"{k}: checkpoint {have[k]}, model {want[k]}"
                  for k in set(want) & set(have) if have[k] != want[k])
  if missing or extra or shapes:
    raise ValueError(
        f"model.init_from={path!r} does not fit config.model: the model has keys the checkpoint "
        f"lacks {missing[:12]}, the checkpoint has keys the model lacks {extra[:12]}, shapes "
        f"differ {shapes[:12]}. Build config.model from the checkpoint "
        "(configs/siglip.py:init=PATH does).")
  return params


def _scans(template) -> tuple[bool, bool]:
  """Which towers of a params tree hold scan-stacked blocks."""
  return tuple("encoderblock" in template.get(tower, {}).get(stack, {})
               for tower, stack in (("img", "Transformer"), ("txt", "Encoder_0")))

