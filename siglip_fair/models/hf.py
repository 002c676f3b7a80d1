"""Two-tower parameters in Hugging Face transformers' `SiglipModel` / `CLIPModel` layout, both ways.

A checkpoint is a folder with `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`), read with numpy only: nothing here imports torch or transformers.

  ckpt = load_hf("siglip-base-patch16-224")       # params, config (our config.model), ...
  model = make_model(ConfigDict(ckpt.config))
  zimg, ztxt, extras = model.apply({"params": ckpt.params}, images, tokens)
  save_hf("out", ckpt.params, ckpt.config, "siglip")   # transformers' from_pretrained loads it

Images are NHWC here where torch takes NCHW: the same pixel values, already resized and
normalised (preprocessing is not part of the model); `ckpt.image_size` is the resolution the
position table was trained for. Token ids are the checkpoint tokenizer's, fed as they are.

The two families as options of our towers (model_config writes them from config.json):
- SigLIP (model_type 'siglip'): MAP-pooled image tower without projection (its output is the
  embedding: image.head='none'), text tower pooled at position L-1 without attention mask
  (padding='none') and a linear head with bias; logit_scale = log t and logit_bias = b, each of
  shape (1,); GELU's tanh approximation, LayerNorm epsilon 1e-6.
- CLIP (model_type 'clip'): class token with its own row of the position table
  (image.pool='tok', cls_posemb=True), a LayerNorm before the blocks (pre_norm), no bias on the
  patch embedding nor on either projection (head_bias=False); causal text attention pooled at
  the end-of-text token (text.causal=True, pool='eos'); logit_scale = log t, shape (), no bias;
  quick-GELU, epsilon 1e-5.
Each row of `_layout` pairs a Hugging Face tensor with one of ours and the exact transposes
between them (hf_layout.py), so a round trip is bit-exact.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import ml_collections
import ml_dtypes  # noqa: F401  registers numpy's 'bfloat16', so bfloat16 files read too
import numpy as np
from safetensors.numpy import load_file, save

from siglip_fair.io import atomic_write
from siglip_fair.models import hf_layout as hl
from siglip_fair.models import trees
from siglip_fair.models.two_tower import make_model
from siglip_fair.models.variants import size_name

FAMILIES = ("siglip", "clip")
_ARCHITECTURES = {"siglip": "SiglipModel", "clip": "CLIPModel"}

# transformers' defaults for the fields a config.json may leave out (configuration_siglip.py,
# configuration_clip.py): released files often list only what differs from them.
_DEFAULTS = {
    "siglip": {
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                       vision_use_head=True),
        "top": {},
    },
    "clip": {
        "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
        "top": dict(projection_dim=512, logit_scale_init_value=2.6592),
    },
}
# Hugging Face `hidden_act` -> our vit.ACTIVATIONS ('gelu_new' is the same tanh formula).
_ACTS = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu": "gelu_erf",
         "quick_gelu": "quick_gelu"}
_HF_ACTS = {"gelu": "gelu_pytorch_tanh", "gelu_erf": "gelu", "quick_gelu": "quick_gelu"}
# Before transformers PR #24773 CLIP configs had eos_token_id=2, and CLIPTextModel still pools
# such checkpoints at the highest token id (OpenAI's rule) instead of the first EOS.
_LEGACY_EOS = 2
# What config.model must say to be each family's architecture (see the module docstring).
_COMMON = {"image.posemb": "learn", "text.padding": "none"}
_ARCH = {
    "siglip": dict(_COMMON, **{
        "image.pool": "map", "image.cls_posemb": False, "image.pre_norm": False,
        "image.patch_bias": True, "image.head": "none", "text.pool": "last",
        "text.causal": False, "text.head": "linear", "head_bias": True, "b_init": "a number"}),
    "clip": dict(_COMMON, **{
        "image.pool": "tok", "image.cls_posemb": True, "image.pre_norm": True,
        "image.patch_bias": False, "image.head": "linear", "text.pool": "eos",
        "text.causal": True, "text.head": "linear", "head_bias": False, "b_init": None}),
}


class HFCheckpoint(NamedTuple):
  params: dict  # our TwoTower params (numpy float32)
  config: dict  # our config.model (make_model(ConfigDict(config)))
  family: str  # 'siglip' | 'clip'
  image_size: int  # px (square) the position table is for


# ---- reading and writing files ----

def read_config(path: str | os.PathLike) -> dict:
  """A checkpoint folder's (or a file's) config.json; raises unless its model_type is one of
  FAMILIES."""
  path = os.fspath(path)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read a Hugging Face config.json at {file!r} ({e}).") from e
  _family(config, file)
  return config


def _family(config: Mapping, where: str = "config.json") -> str:
  family = config.get("model_type") if isinstance(config, Mapping) else None
  if family not in FAMILIES:
    raise ValueError(
        f"{where} has model_type={family!r}; models.hf reads 'siglip' (SiglipModel) and 'clip' "
        f"(CLIPModel) checkpoints only (SigLIP 2's 'siglip2' NaFlex layout is not supported; "
        f"big_vision .npz files load with models.big_vision).")
  return family


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of a folder's model.safetensors (or its shards), or of one .safetensors file.

  Read with numpy (bfloat16 through ml_dtypes); from_hf widens every tensor to float32.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    return load_file(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(load_file(os.path.join(path, shard)))
    return out
  file = os.path.join(path, "model.safetensors")
  if not os.path.exists(file):
    raise ValueError(f"{path!r} has no model.safetensors (nor model.safetensors.index.json): "
                     f"found {sorted(os.listdir(path))[:12]}. Save with "
                     "save_pretrained(..., safe_serialization=True).")
  return load_file(file)


def load_hf(path: str | os.PathLike, *, scan=False) -> HFCheckpoint:
  """Reads a SiglipModel / CLIPModel checkpoint folder into our params and config.model.

  scan: False (per-layer blocks), True or (image, text): the towers whose blocks our model runs
  under nn.scan (stacked parameters), as model.<tower>.scan.
  """
  config = read_config(path)
  params = from_hf(load_safetensors(path), config, scan=scan)
  return HFCheckpoint(params, model_config(config, scan=scan), config["model_type"],
                      _towers(config)[1]["image_size"])


def save_hf(path: str | os.PathLike, params, config, family: str) -> str:
  """Writes our params as a Hugging Face checkpoint folder (config.json + model.safetensors,
  float32) that `SiglipModel` / `CLIPModel.from_pretrained(path)` loads; returns the folder.

  config: our config.model for `params` (a dict or ConfigDict); it must be the family's
  architecture (e.g. from model_config / load_hf), else the error lists what differs.
  """
  tensors, hf_config = to_hf(params, config, family)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  atomic_write(os.path.join(path, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
  atomic_write(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2) + "\n")
  return path


# ---- config.json <-> our config.model ----

def _towers(config: Mapping) -> tuple[dict, dict, dict]:
  """(text, vision, top-level) settings of a config.json with transformers' defaults filled in.

  Old CLIP files also hold `text_config_dict` / `vision_config_dict`, which transformers lets
  override `text_config` / `vision_config`; so do we.
  """
  family = _family(config)
  defaults = _DEFAULTS[family]
  text = {**defaults["text"], **(config.get("text_config") or {}),
          **(config.get("text_config_dict") or {})}
  vision = {**defaults["vision"], **(config.get("vision_config") or {}),
            **(config.get("vision_config_dict") or {})}
  top = {k: config.get(k, v) for k, v in defaults["top"].items()}
  if family == "siglip" and text.get("projection_size") is None:
    text["projection_size"] = text["hidden_size"]
  for key in ("image_size", "patch_size"):
    value = vision[key]
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"vision_config.{key}={value}: only square images and patches are "
                         "supported.")
      vision[key] = value[0]
  if vision["num_channels"] != 3:
    raise ValueError(f"vision_config.num_channels={vision['num_channels']}; RGB (3) only.")
  if vision["image_size"] % vision["patch_size"]:
    raise ValueError(f"vision_config.image_size={vision['image_size']} is not a multiple of "
                     f"patch_size={vision['patch_size']}.")
  for name, tower in (("text_config", text), ("vision_config", vision)):
    if tower["hidden_act"] not in _ACTS:
      raise ValueError(f"{name}.hidden_act={tower['hidden_act']!r} is not supported; use one "
                       f"of {sorted(_ACTS)}.")
  return text, vision, top


def _sizes(tower: Mapping) -> dict:
  """Width, depth, MLP width, heads of a config.json tower, under a SIZES name when one fits."""
  sizes = dict(width=int(tower["hidden_size"]), depth=int(tower["num_hidden_layers"]),
               mlp_dim=int(tower["intermediate_size"]),
               num_heads=int(tower["num_attention_heads"]))
  return dict(variant=size_name(**sizes) or "mu", **sizes)


def _scans(scan) -> tuple[bool, bool]:
  if isinstance(scan, (bool, np.bool_)):
    return bool(scan), bool(scan)
  if len(scan) != 2:
    raise ValueError(f"scan={scan!r}; use a bool or (image, text) bools.")
  return bool(scan[0]), bool(scan[1])


def model_config(config: Mapping, *, scan=False) -> dict:
  """Our config.model for a SiglipModel / CLIPModel config.json (a dict, e.g. read_config's),
  so that make_model(ConfigDict(model_config(config))) computes the same embeddings.
  `scan` as in load_hf."""
  family = _family(config)
  text, vision, top = _towers(config)
  image_scan, text_scan = _scans(scan)
  patch = int(vision["patch_size"])
  image = _sizes(vision)
  image.update(variant=f"{image['variant']}/{patch}", posemb="learn", scan=image_scan,
               act=_ACTS[vision["hidden_act"]], norm_eps=float(vision["layer_norm_eps"]))
  txt = dict(_sizes(text), vocab_size=int(text["vocab_size"]),
             max_len=int(text["max_position_embeddings"]), padding="none", scan=text_scan,
             act=_ACTS[text["hidden_act"]], norm_eps=float(text["layer_norm_eps"]))
  if family == "siglip":
    if not vision["vision_use_head"]:
      raise ValueError("vision_config.vision_use_head=False: SiglipModel's image embedding is "
                       "its attention-pooling head, which this checkpoint does not have.")
    embed_dim = int(vision["hidden_size"])
    if int(text["projection_size"]) != embed_dim:
      raise ValueError(f"text_config.projection_size={text['projection_size']} differs from "
                       f"vision_config.hidden_size={embed_dim} (the image embedding's width).")
    image.update(pool="map", head="none")
    txt.update(pool="last", head="linear")
    return dict(image=image, text=txt, embed_dim=embed_dim, head="linear", head_bias=True,
                t_init=10.0, b_init=-10.0)
  eos = text.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    raise ValueError(f"text_config.eos_token_id={eos}: CLIPTextModel pools at one EOS id; a "
                     "list is not supported.")
  image.update(pool="tok", cls_posemb=True, pre_norm=True, patch_bias=False, head="linear")
  # No EOS id at all: OpenAI's own rule (the highest id), as for the legacy id.
  txt.update(pool="eos", eos_id=None if eos in (None, _LEGACY_EOS) else int(eos), causal=True,
             head="linear")
  return dict(image=image, text=txt, embed_dim=int(top["projection_dim"]), head="linear",
              head_bias=False, t_init=float(np.exp(top["logit_scale_init_value"])), b_init=None)


def _make_model(config):
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  return make_model(config)


def _hf_config(model, family: str, image_size: int) -> dict:
  """The config.json of the SiglipModel / CLIPModel that computes what `model` does; raises,
  listing every difference, when `model` is not that family's architecture."""
  img, txt = model.img, model.txt
  have = {"image.pool": img.pool, "image.posemb": img.posemb, "image.cls_posemb": img.cls_posemb,
          "image.pre_norm": img.pre_norm, "image.patch_bias": img.patch_bias,
          "image.head": model.image_head or model.head, "text.pool": txt.pool,
          "text.padding": txt.padding, "text.causal": txt.causal,
          "text.head": model.text_head or model.head, "head_bias": model.head_bias,
          "b_init": None if model.b_init is None else "a number"}
  wrong = [f"{k}={have[k]!r} (needs {need!r})" for k, need in _ARCH[family].items()
           if have[k] != need]
  if img.patch_size[0] != img.patch_size[1]:
    wrong.append(f"image patch {img.patch_size} (needs a square patch)")
  if family == "clip" and txt.eos_id == _LEGACY_EOS:
    # CLIPTextModel reads eos_token_id 2 as "pool at the highest id": a real EOS id 2 is lost.
    wrong.append(f"text.eos_id={_LEGACY_EOS} (CLIPTextModel pools at the highest id then)")
  if wrong:
    raise ValueError(f"config.model is not Hugging Face's {_ARCHITECTURES[family]} "
                     f"architecture: {', '.join(wrong)}.")

  def tower(module, **extra):
    return dict(hidden_size=module.width, intermediate_size=module.mlp_dim,
                num_hidden_layers=module.depth, num_attention_heads=module.num_heads,
                hidden_act=_HF_ACTS[module.act], layer_norm_eps=module.norm_eps, **extra)

  vision = tower(img, image_size=image_size, patch_size=img.patch_size[0], num_channels=3,
                 model_type=f"{family}_vision_model")
  text = tower(txt, vocab_size=txt.vocab_size, max_position_embeddings=txt.max_len,
               model_type=f"{family}_text_model")
  out = {"architectures": [_ARCHITECTURES[family]], "model_type": family, "dtype": "float32"}
  if family == "siglip":
    vision["vision_use_head"] = True
    text["projection_size"] = model.embed_dim
  else:
    text["eos_token_id"] = _LEGACY_EOS if txt.eos_id is None else txt.eos_id
    text["projection_dim"] = vision["projection_dim"] = model.embed_dim
    out.update(projection_dim=model.embed_dim,
               logit_scale_init_value=float(np.log(model.t_init)))
  return dict(out, text_config=text, vision_config=vision)


# ---- tensors <-> params ----
def _layout(config: Mapping) -> list[tuple]:
  """Every (Hugging Face tensor, our parameter) pair of a config.json's model (see row)."""
  family = _family(config)
  text, vision, _ = _towers(config)
  v, t = "vision_model", "text_model"
  rows = [hl.row(f"{v}.embeddings.patch_embedding.weight", "img/embedding/kernel", hl.conv()),
          hl.row(f"{v}.embeddings.position_embedding.weight", "img/pos_embedding", hl.table()),
          hl.row(f"{t}.embeddings.token_embedding.weight", "txt/embedding/embedding",
                 hl.identity()),
          hl.row(f"{t}.embeddings.position_embedding.weight", "txt/pos_embedding", hl.table())]
  rows += hl.encoder(v, "img/Transformer", vision) + hl.encoder(t, "txt/Encoder_0", text)
  rows += (hl.norm(f"{v}.post_layernorm", "img/Transformer/encoder_norm")
           + hl.norm(f"{t}.final_layer_norm", "txt/Encoder_0/encoder_norm"))
  if family == "siglip":
    head = f"{v}.head"
    rows += [hl.row(f"{v}.embeddings.patch_embedding.bias", "img/embedding/bias", hl.identity()),
             hl.row(f"{head}.probe", "img/MAPHead_0/probe", hl.identity())]
    rows += (hl.attention(f"{head}.attention", "img/MAPHead_0/MultiHeadDotProductAttention_0",
                        int(vision["num_attention_heads"]), packed=True)
             + hl.norm(f"{head}.layernorm", "img/MAPHead_0/LayerNorm_0")
             + hl.mlp(f"{head}.mlp", "img/MAPHead_0/MlpBlock_0")
             + hl.linear(f"{t}.head", "txt_head")
             + [hl.row("logit_scale", "t", hl.scalar((1,))),
                hl.row("logit_bias", "b", hl.scalar((1,)))])
  else:
    rows += ([hl.row(f"{v}.embeddings.class_embedding", "img/cls", hl.vector())]
             + hl.norm(f"{v}.pre_layrnorm", "img/pre_norm")
             + hl.linear("visual_projection", "img_head", bias=False)
             + hl.linear("text_projection", "txt_head", bias=False)
             + [hl.row("logit_scale", "t", hl.scalar(()))])
  return rows


def _show(keys) -> str:
  keys = sorted(keys)
  return f"{keys[:12]}{' ...' if len(keys) > 12 else ''} ({len(keys)} keys)"


def _check_keys(tensors: Mapping, config: Mapping, rows) -> None:
  """Raises naming the keys when `tensors` are not exactly the checkpoint config.json describes.
  Non-persistent buffers older files may still hold (`*.position_ids`) are ignored."""
  have = {k for k in tensors if not k.endswith(".position_ids")}
  if not any(k.startswith(("vision_model.", "text_model.")) for k in have):
    raise ValueError(
        "unknown checkpoint layout: expected Hugging Face SiglipModel / CLIPModel keys "
        f"'vision_model.…', 'text_model.…', 'logit_scale', but these keys did not match: "
        f"{_show(have)}.")
  want = {row[0] for row in rows}
  missing, unknown = want - have, have - want
  if missing or unknown:
    raise ValueError(
        f"not the {_ARCHITECTURES[config['model_type']]} its config.json describes: missing "
        f"keys {_show(missing)}, unknown keys {_show(unknown)}. Is config.json the one saved "
        "with these weights?")


def _check_shapes(model, params, image_size: int) -> None:
  """Raises, naming our keys, unless `params` have exactly `model`'s tree and shapes at
  `image_size` px."""
  trees.check_fit(model, params, (image_size, image_size), what="the params")


def from_hf(tensors: Mapping[str, np.ndarray], config: Mapping, *, scan=False) -> dict:
  """Hugging Face tensors (load_safetensors) + their config.json (read_config) -> our nested
  params (float32 numpy) for make_model(ConfigDict(model_config(config, scan=scan))).

  Raises, naming the keys, on an unknown layout, on missing or unexpected tensors and on shapes
  that do not fit config.json.
  """
  rows = _layout(config)
  _check_keys(tensors, config, rows)
  flat = {}
  for hf, part, ours, to_ours, _ in rows:
    value = np.asarray(tensors[hf])
    try:
      value = to_ours(value if part is None else np.split(value, 3)[part])
    except ValueError as e:  # a reshape by config.json's head count, a split in thirds
      raise ValueError(f"{hf} has shape {value.shape}, which does not fit config.json ({e}).") \
          from None
    # Parameters are float32, as our model creates them (float16 / bfloat16 widen exactly);
    # np.array, not ascontiguousarray, which turns a 0-d logit_scale into shape (1,).
    flat[ours] = np.array(value, np.float32, order="C")
  image_scan, text_scan = _scans(scan)
  params = hl.stack(hl.nest(flat), [t for t, s in (("img", image_scan), ("txt", text_scan)) if s])
  _check_shapes(_make_model(model_config(config, scan=scan)), params,
                _towers(config)[1]["image_size"])
  return params


def to_hf(params, config, family: str) -> tuple[dict[str, np.ndarray], dict]:
  """Our params and config.model -> (Hugging Face tensors, config.json dict) of `family`."""
  if family not in FAMILIES:
    raise ValueError(f"family={family!r}; use one of {FAMILIES}.")
  model = _make_model(config)
  flat = hl.flatten(hl.unstack(params))
  if "img/pos_embedding" not in flat or "img/embedding/kernel" not in flat:
    raise ValueError("params have no img/pos_embedding or img/embedding/kernel; are these a "
                     "TwoTower's params with a learnt position embedding?")
  positions = flat["img/pos_embedding"].shape[1] - int(model.img.cls_posemb)
  grid = int(round(positions ** 0.5))
  if grid * grid != positions:
    raise ValueError(f"img/pos_embedding has {positions} patch positions, not a square grid; "
                     "Hugging Face's vision towers take square images only.")
  image_size = grid * model.img.patch_size[0]
  hf_config = _hf_config(model, family, image_size)
  _check_shapes(model, params, image_size)
  tensors: dict[str, np.ndarray] = {}
  parts: dict[str, dict[int, np.ndarray]] = {}
  for hf, part, ours, _, to_theirs in _layout(hf_config):
    value = to_theirs(flat[ours])
    if part is None:
      tensors[hf] = np.array(value, order="C")
    else:
      parts.setdefault(hf, {})[part] = value
  for hf, by_part in parts.items():
    # C order explicitly: concatenating transposed views gives a Fortran-ordered array, whose
    # buffer safetensors would write as it lies in memory (transposed).
    tensors[hf] = np.array(np.concatenate([by_part[i] for i in range(3)]), order="C")
  return tensors, hf_config
