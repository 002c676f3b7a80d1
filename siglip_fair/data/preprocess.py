"""Preprocessing of released two-tower models as config: one preset per family and source.

A released model scores as published only with the preprocessing it was trained with: resize
method, crop, pixel normalisation, lower-casing, tokenizer, maximum length, padding and the
end-of-sequence rule. Each is a config field here; `preset(name)` holds a family's values and
`models/released.py` picks the preset of the checkpoint it loads (every field overridable).

  image = preset("clip").image          # size, resize, method, crop, mean, std
  pixels = prepare(raw_uint8, image)    # uint8 [S, S, 3]: resized and cropped
  x = to_unit_range(pixels)             # float32 in [-1, 1]: what every model here takes
  # A model with model.image.pixel_mean/std (from `image.mean/std`) maps x to
  # (pixels / 255 - mean) / std itself (`normalize`), so the project's pipelines, evaluators,
  # annotation and training feed [-1, 1] to every model, released or not.

Presets (sources: big_vision's SigLIP / SigLIP 2 demo colabs, transformers' SiglipProcessor and
CLIPProcessor, OpenAI's clip.tokenize):
- 'siglip' (big_vision SigLIP .npz): the whole image resized to S x S by TF's bilinear resize
  without antialiasing, truncated back to uint8 (big_vision `resize(S)`); [-1, 1]; the
  sentencepiece tokenizer (c4_en / mc4) without lower-casing, EOS kept last ('sticky') and
  padded with EOS (pad_value=1) to 64 tokens.
- 'siglip2' (big_vision SigLIP 2 .npz): the same image rule; Gemma's sentencepiece tokenizer on
  lower-cased text, no BOS, sticky EOS, padded with '<pad>' (id 0) to 64 (the SigLIP 2 colab's
  `lower|tok(length=64, model="gemma", bos="no", eos="sticky")`). big_vision's `lower` is
  tf.strings.lower with its default encoding, which lower-cases A-Z only: lower='ascii'.
- 'siglip_hf' (transformers SiglipModel folder): S x S by PIL's bicubic (antialiased) resize;
  [-1, 1]; the sentencepiece tokenizer after lower-casing, ASCII punctuation removal and
  whitespace collapsing (SiglipTokenizer's canonicalize_text), sticky EOS, padded with '</s>'.
- 'siglip2_hf' (a SiglipModel folder with the 256k Gemma tokenizer.json, SigLIP 2 FixRes):
  the 'siglip_hf' image rule; big_vision's SigLIP 2 text rule on the tokenizer.json's pieces.
- 'clip' (OpenAI CLIP / transformers CLIPModel folder): the shorter side resized to S by PIL
  bicubic, the centre S x S cropped; OpenAI's mean / std; the byte-level BPE of a
  `tokenizer.json` (its normaliser lower-cases), '<|startoftext|>' first, sticky
  '<|endoftext|>', padded with '<|endoftext|>' to 77 (OpenAI pads with id 0: the causal,
  EOS-pooled text tower reads nothing after the EOS, so both give the same embedding).
A transformers folder's preprocessor_config.json, when present, overrides the image fields
(`from_hf_processor`).
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
import PIL.Image

# PIL's filters; 'tf_bilinear' is TF's bilinear resize without antialiasing (big_vision).
PIL_METHODS = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
               "bicubic": PIL.Image.Resampling.BICUBIC, "lanczos": PIL.Image.Resampling.LANCZOS,
               "box": PIL.Image.Resampling.BOX, "hamming": PIL.Image.Resampling.HAMMING}
METHODS = (*PIL_METHODS, "tf_bilinear")
# 'squash': both sides to S (aspect ratio not kept); 'shorter': the shorter side to S, the
# longer to int(S * long / short) (transformers' rule); 'none': as given.
RESIZES = ("squash", "shorter", "none")
TOKENIZER_KINDS = ("sentencepiece", "hf")
EOS_MODES = ("none", "yes", "sticky")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
UNIT_RANGE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (x / 255 - 0.5) / 0.5: [-1, 1]

_SIGLIP_IMAGE = dict(size=0, resize="squash", method="tf_bilinear", crop=False,
                     mean=UNIT_RANGE[0], std=UNIT_RANGE[1])
# Text fields (those of config.tokenizer): max_len 0 = the checkpoint's text length.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "siglip": dict(
        image=_SIGLIP_IMAGE,
        text=dict(kind="sentencepiece", max_len=0, lower=False, canonicalize=False, bos="",
                  eos="sticky", eos_token="</s>", pad_token="</s>")),
    "siglip2": dict(
        image=_SIGLIP_IMAGE,
        text=dict(kind="sentencepiece", max_len=0, lower="ascii", canonicalize=False, bos="",
                  eos="sticky", eos_token="<eos>", pad_token="<pad>")),
    "siglip_hf": dict(
        image=dict(_SIGLIP_IMAGE, method="bicubic"),
        text=dict(kind="sentencepiece", max_len=0, lower=True, canonicalize=True, bos="",
                  eos="sticky", eos_token="</s>", pad_token="</s>")),
    # A transformers SiglipModel with the 256k Gemma vocabulary (SigLIP 2 FixRes) and its
    # tokenizer.json: big_vision's SigLIP 2 text rules ('<eos>', '<pad>', no BOS).
    "siglip2_hf": dict(
        image=dict(_SIGLIP_IMAGE, method="bicubic"),
        text=dict(kind="hf", max_len=0, lower="ascii", canonicalize=False, bos="", eos="sticky",
                  eos_token="<eos>", pad_token="<pad>")),
    "clip": dict(
        image=dict(size=0, resize="shorter", method="bicubic", crop=True, mean=OPENAI_MEAN,
                   std=OPENAI_STD),
        text=dict(kind="hf", max_len=0, lower=False, canonicalize=False, bos="<|startoftext|>",
                  eos="sticky", eos_token="<|endoftext|>", pad_token="<|endoftext|>")),
}


def preset(name: str) -> ml_collections.ConfigDict:
  """ConfigDict(image=..., text=...) of a preset (see the module docstring)."""
  if name not in PRESETS:
    raise ValueError(f"preprocessing preset {name!r} is not known; use one of {sorted(PRESETS)}.")
  # Not type-safe: a field may be overridden with another type (tokenizer.lower 'ascii' by
  # true / false).
  return ml_collections.ConfigDict({k: dict(v) for k, v in PRESETS[name].items()},
                                   type_safe=False)


def check_image_config(cfg) -> None:
  """Raises naming the field when an image preprocessing config cannot work."""
  if cfg["resize"] not in RESIZES:
    raise ValueError(f"preprocess.resize={cfg['resize']!r}; use one of {RESIZES}.")
  if cfg["method"] not in METHODS:
    raise ValueError(f"preprocess.method={cfg['method']!r}; use one of {METHODS}.")
  if int(cfg["size"]) < 1 and (cfg["resize"] != "none" or cfg["crop"]):
    raise ValueError(f"preprocess.size={cfg['size']} must be >= 1 to resize or crop to it.")
  for key in ("mean", "std"):
    if len(tuple(cfg[key])) != 3:
      raise ValueError(f"preprocess.{key}={tuple(cfg[key])} needs one value per RGB channel.")
  if not all(float(s) > 0 for s in cfg["std"]):
    raise ValueError(f"preprocess.std={tuple(cfg['std'])} must be > 0.")


# ---- images ----

def rgb_channels(image) -> np.ndarray:
  """[H, W, 3] from [H, W] or [H, W, 1|3|4] (alpha dropped, grey repeated), dtype kept."""
  img = np.asarray(image)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] not in (3, 4):
    raise ValueError(f"expected an [H, W, 1|3|4] image, got shape {img.shape}.")
  return img[..., :3]


def _as_rgb(image) -> np.ndarray:
  """uint8 [H, W, 3] from [H, W], [H, W, 1|3|4] uint8 (alpha dropped, grey repeated)."""
  img = rgb_channels(image)
  if img.dtype != np.uint8:
    # Float images would be rescaled a second time and silently give wrong pixels.
    raise ValueError(f"images must be uint8 [H, W, 3] in [0, 255], got {img.dtype}.")
  return img


def _tf_bilinear_weights(in_size: int, out_size: int):
  """TF's ResizeBilinear(half_pixel_centers=True) sampling along one axis, in float32 as its
  kernel computes it: (lower index [n], upper index [n], lerp float32 [n])."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(src)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  return lower, upper, (src - floor).astype(np.float32)


def tf_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """float32 [h, w, C]: `tf.image.resize(image, size, 'bilinear', antialias=False)` (half-pixel
  centres, edges clamped, no low-pass filter when shrinking), in TF's float32 lerp order."""
  x = np.asarray(image, np.float32)
  y0, y1, ly = _tf_bilinear_weights(x.shape[0], size[0])
  x0, x1, lx = _tf_bilinear_weights(x.shape[1], size[1])
  lx = lx[None, :, None]
  top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * lx
  bottom = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * lx
  return top + (bottom - top) * ly[:, None, None]


def resize(image: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] by `method` (a PIL filter, antialiased when shrinking,
  or 'tf_bilinear': big_vision's resize, whose float result it casts back to uint8 by
  truncation, as `tf.cast` does)."""
  h, w = int(size[0]), int(size[1])
  if image.shape[:2] == (h, w):
    return image
  if method == "tf_bilinear":
    return np.clip(tf_bilinear(image, (h, w)), 0, 255).astype(np.uint8)
  if method not in PIL_METHODS:
    raise ValueError(f"resize method={method!r}; use one of {METHODS}.")
  return np.asarray(PIL.Image.fromarray(image).resize((w, h), resample=PIL_METHODS[method]))


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) with the shorter side `size` and the longer int(size * long / short)
  (transformers' get_resize_output_image_size: truncated, not rounded)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The centre size x size window, top-left at ((H - size) // 2, (W - size) // 2); an image
  smaller than that is zero-padded around it first (as transformers does)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def prepare(image, cfg) -> np.ndarray:
  """One raw uint8 image [H, W, 1|3|4] -> uint8 [S, S, 3] under an image config (preset(...)
  .image): resized by `resize` / `method` to `size`, then centre-cropped when `crop`."""
  image = _as_rgb(image)
  size = int(cfg["size"])
  if cfg["resize"] == "squash":
    image = resize(image, (size, size), cfg["method"])
  elif cfg["resize"] == "shorter":
    image = resize(image, shorter_side_size(*image.shape[:2], size), cfg["method"])
  elif cfg["resize"] != "none":
    raise ValueError(f"preprocess.resize={cfg['resize']!r}; use one of {RESIZES}.")
  if cfg["crop"]:
    image = center_crop(image, size)
  return image


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1] (x / 127.5 - 1), the input of every model here."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}.")
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def unit_range_affine(mean, std) -> tuple[np.ndarray, np.ndarray] | None:
  """(a [3], b [3]) with x * a + b = ((x + 1) / 2 - mean) / std for x in [-1, 1], i.e. pixels
  p / 255 normalised by mean / std; None when that is x itself (mean = std = 0.5, SigLIP)."""
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f"pixel mean {tuple(mean)} / std {tuple(std)} need 3 values each.")
  a, b = 0.5 / std, (0.5 - mean) / std
  if np.all(a == 1.0) and np.all(b == 0.0):
    return None
  return a.astype(np.float32), b.astype(np.float32)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """float32 [..., 3] in [-1, 1] -> the pixel normalisation (p / 255 - mean) / std, by the
  same affine map a model with model.image.pixel_mean / pixel_std applies (vit.ViT)."""
  affine = unit_range_affine(mean, std)
  images = np.asarray(images, np.float32)
  return images if affine is None else images * affine[0] + affine[1]


def pixels(images, cfg) -> np.ndarray:
  """Raw uint8 images (a list of [H, W, C] or one [N, H, W, C] array) -> float32 [N, S, S, 3]
  normalised as the checkpoint expects: what transformers' image processors return (NHWC)."""
  prepared = np.stack([prepare(im, cfg) for im in images])
  return normalize(to_unit_range(prepared), cfg["mean"], cfg["std"])


class ImageView:
  """A random-access source whose records' 'image' go through `prepare(image, cfg)`."""

  def __init__(self, source, cfg):
    check_image_config(cfg)
    self.source, self.cfg = source, cfg

  def __len__(self) -> int:
    return len(self.source)

  def _convert(self, record):
    return {**record, "image": prepare(record["image"], self.cfg)}

  def __getitem__(self, i):
    return self._convert(self.source[i])

  def __getitems__(self, indices):
    getitems = getattr(self.source, "__getitems__", None)
    records = getitems(list(indices)) if getitems else [self.source[i] for i in indices]
    return [self._convert(r) for r in records]


def images_at(images, cfg) -> np.ndarray:
  """Raw uint8 images (a list of [H, W, C] or one [N, H, W, C] array) -> float32
  [N, S, S, 3] in [-1, 1]: `prepare` then `to_unit_range`
  (pixel normalisation beyond that is the model's, model.image.pixel_mean / pixel_std)."""
  return to_unit_range(np.stack([prepare(im, cfg) for im in images]))


# ---- transformers' preprocessor_config.json ----

# PIL resample ids as transformers stores them (PILImageResampling).
_PIL_IDS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def from_hf_processor(config: Mapping) -> dict:
  """Image fields of a transformers image processor's preprocessor_config.json (SigLIP / CLIP:
  resize, crop, rescale, normalise); raises on settings these fields cannot express."""
  out: dict[str, Any] = {}
  size = config.get("size") or {}
  if not config.get("do_resize", True):
    out["resize"] = "none"
  elif "shortest_edge" in size:
    out.update(resize="shorter", size=int(size["shortest_edge"]))
  elif "height" in size and "width" in size:
    if size["height"] != size["width"]:
      raise ValueError(f"preprocessor_config.json size={size}: only square images are "
                       "supported.")
    out.update(resize="squash", size=int(size["height"]))
  elif size:
    raise ValueError(f"preprocessor_config.json size={size} is not supported (use height and "
                     "width, or shortest_edge).")
  if "resample" in config:
    if config["resample"] not in _PIL_IDS:
      raise ValueError(f"preprocessor_config.json resample={config['resample']!r} is not a PIL "
                       "filter id.")
    out["method"] = _PIL_IDS[config["resample"]]
  crop = config.get("crop_size") or {}
  out["crop"] = bool(config.get("do_center_crop", False))
  if out["crop"]:
    if crop.get("height") != crop.get("width"):
      raise ValueError(f"preprocessor_config.json crop_size={crop}: only square crops.")
    if out.get("size") not in (None, crop["height"]) and out.get("resize") != "shorter":
      raise ValueError(f"preprocessor_config.json crops {crop} from a {size} resize; only a "
                       "crop of the resize's size is supported.")
    out["crop_size"] = int(crop["height"])
  if config.get("do_rescale", True) and abs(float(config.get("rescale_factor", 1 / 255))
                                            - 1 / 255) > 1e-12:
    raise ValueError(f"preprocessor_config.json rescale_factor={config['rescale_factor']}; "
                     "only 1/255 is supported.")
  if not config.get("do_rescale", True):
    raise ValueError("preprocessor_config.json do_rescale=false is not supported.")
  if config.get("do_normalize", True):
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
      if key in config:
        value = config[key]
        out[field] = tuple(float(v) for v in (value if isinstance(value, (list, tuple))
                                              else [value] * 3))
  else:
    out.update(mean=(0.0,) * 3, std=(1.0,) * 3)
  return out


def apply_hf_processor(image_cfg, config: Mapping) -> None:
  """Updates an image config in place from a preprocessor_config.json (see from_hf_processor).
  transformers resizes the shorter side to shortest_edge and then crops crop_size; here both
  are `size`, so a crop of another size than the resize is refused."""
  fields = from_hf_processor(config)
  crop = fields.pop("crop_size", None)
  if crop is not None and fields.get("resize") == "shorter" and crop != fields["size"]:
    raise ValueError(f"preprocessor_config.json resizes the shorter side to {fields['size']} "
                     f"and crops {crop}; only a crop of the resize's size is supported.")
  image_cfg.update(fields)


# ---- text ----

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
  """ASCII punctuation removed, whitespace runs collapsed to one space, ends stripped
  (big_vision's prompt canonicalisation, transformers' SiglipTokenizer)."""
  return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()
