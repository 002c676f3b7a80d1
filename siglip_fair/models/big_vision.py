"""Two-tower parameters in big_vision's SigLIP `.npz` layout, both ways.

big_vision keeps the projections inside the towers (`img/head`, `txt/head`), names the text
embedding `txt/Embed_0`, stores `t`/`b` with shape (1,) and may stack a tower's blocks along a
leading depth axis (`encoderblock/...`, trained with scan=True). Everything else has the same
names here. Checkpoints hold flat '/'-joined keys, optionally under `params/` (train state).
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping

import jax
import numpy as np

from siglip_fair.io import atomic_savez
from siglip_fair.models.variants import SIZES


def _attention(prefix):
  return [f"{prefix}/{p}/{w}" for p in ("query", "key", "value", "out") for w in ("kernel", "bias")]


def _norm(prefix):
  return [f"{prefix}/scale", f"{prefix}/bias"]


_MLP = [f"MlpBlock_0/Dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias")]
_BLOCK = (_norm("LayerNorm_0") + _attention("MultiHeadDotProductAttention_0")
          + _norm("LayerNorm_1") + _MLP)
_MAP = ["probe"] + _attention("MultiHeadDotProductAttention_0") + _norm("LayerNorm_0") + _MLP
# tower -> (name of its block stack, keys it always has)
_TOWERS = {"img": ("Transformer", ["embedding/kernel", "embedding/bias"]),
           "txt": ("Encoder_0", ["Embed_0/embedding", "pos_embedding"])}
_BLOCK_RE = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock_(\d+)/")


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(jax.device_get(value))
  return out


def _canonical(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips `params/` and un-stacks scan-style blocks; then checks the key set."""
  if any(k.startswith("params/") for k in flat):
    # Train checkpoints also hold optimizer state etc. beside `params/`.
    flat = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
  out = {}
  for key, value in flat.items():
    tower, sep, rest = key.partition("/encoderblock/")
    if not sep:
      out[key] = np.asarray(value)
      continue
    if any(k.startswith(f"{tower}/encoderblock_") for k in flat):
      raise ValueError(f"{tower!r} has both scan-stacked 'encoderblock/' and per-layer "
                       "'encoderblock_<i>/' keys; expected one layout.")
    for i, layer in enumerate(np.asarray(value)):
      out[f"{tower}/encoderblock_{i}/{rest}"] = layer
  expected = _expected(out)
  missing, unknown = sorted(expected - set(out)), sorted(set(out) - expected)
  if missing or unknown:
    show = lambda keys: f"{keys[:12]}{' ...' if len(keys) > 12 else ''}"  # noqa: E731
    raise ValueError(f"not a big_vision two-tower checkpoint: missing keys {show(missing)}, "
                     f"unknown keys {show(unknown)}; use the SigLIP two-tower params of a "
                     "big_vision run (img/..., txt/..., t), or write ours with "
                     "models.big_vision.save_npz.")
  return out


def _expected(flat) -> set[str]:
  """The keys a checkpoint with these towers, blocks, heads, bias and pools must have."""
  has = lambda prefix: any(k.startswith(prefix) for k in flat)  # noqa: E731
  keys = {"t"} | ({"b"} if "b" in flat else set())
  head = has("img/head/") or has("txt/head/")
  for tower, (stack, always) in _TOWERS.items():
    keys |= {f"{tower}/{k}" for k in always}
    keys |= {f"{tower}/{k}" for k in ("pos_embedding", "cls") if f"{tower}/{k}" in flat}
    depth = 1 + max((int(m[2]) for k in flat if (m := _BLOCK_RE.match(k))
                     and m[1] == f"{tower}/{stack}"), default=0)
    keys |= {f"{tower}/{stack}/encoderblock_{i}/{k}" for i in range(depth) for k in _BLOCK}
    keys |= {f"{tower}/{stack}/{k}" for k in _norm("encoder_norm")}
    if has(f"{tower}/MAPHead_0/"):
      keys |= {f"{tower}/MAPHead_0/{k}" for k in _MAP}
    if head:
      keys |= {f"{tower}/head/kernel", f"{tower}/head/bias"}
  return keys


def to_big_vision(params) -> dict[str, np.ndarray]:
  """Our `TwoTower` params -> flat big_vision keys `params/...` (t, b with shape (1,))."""
  flat = {}
  for key, value in _flatten(params).items():
    top, _, rest = key.partition("/")
    if top in ("img_head_hidden", "txt_head_hidden"):
      raise ValueError("model.head='mlp' has no big_vision equivalent; only 'linear' and "
                       "'none' heads can be exported.")
    if top in ("t", "b") and not rest:
      flat[top] = value.reshape(1)
    elif top in ("img_head", "txt_head"):
      flat[f"{top[:3]}/head/{rest}"] = value
    elif key.startswith("txt/embedding/"):
      flat["txt/Embed_0/" + key[len("txt/embedding/"):]] = value
    elif top in ("img", "txt"):
      flat[key] = value
    else:
      raise ValueError(f"unexpected parameter {key!r}; are these a TwoTower's params?")
  _canonical(flat)  # what we write must load back
  return {f"params/{k}": v for k, v in flat.items()}


def from_big_vision(flat: Mapping[str, np.ndarray]) -> dict:
  """Flat big_vision keys (with or without `params/`, per-layer or scan-stacked blocks) ->
  our nested params (np arrays; t, b scalars). Raises ValueError on missing/unknown keys."""
  params: dict = {}
  for key, value in _canonical(flat).items():
    if key in ("t", "b"):
      value = value.reshape(())
    elif key.startswith(("img/head/", "txt/head/")):
      key = f"{key[:3]}_head/{key[len('img/head/'):]}"
    elif key.startswith("txt/Embed_0/"):
      key = "txt/embedding/" + key[len("txt/Embed_0/"):]
    *path, leaf = key.split("/")
    node = params
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return params


def save_npz(path: str | os.PathLike, params) -> str:
  """Writes our params as a big_vision `.npz` (atomically); returns the path."""
  return atomic_savez(path, **to_big_vision(params))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.npz` into {flat key: array} without ever unpickling."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except ValueError as e:
    if "pickle" not in str(e):
      raise
    raise ValueError(f"{os.fspath(path)!r} holds pickled Python objects (object arrays), "
                     "which are never loaded (allow_pickle=False: a pickle can run code, so "
                     "the file is not trusted); save plain numeric arrays, e.g. with "
                     "models.big_vision.save_npz.") from None
  except (AttributeError, TypeError, zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{os.fspath(path)!r} is not a readable .npz archive ({e}).") from e


def _tower_sizes(flat, tower, stack) -> dict:
  width = flat[f"{tower}/{stack}/encoder_norm/scale"].shape[-1]
  depth = 1 + max(int(m[2]) for k in flat if (m := _BLOCK_RE.match(k)) and m[1].startswith(tower))
  block = f"{tower}/{stack}/encoderblock_0/"
  heads = flat[block + "MultiHeadDotProductAttention_0/query/kernel"].shape[1]
  mlp_dim = flat[block + "MlpBlock_0/Dense_0/kernel"].shape[1]
  if f"{tower}/MAPHead_0/probe" in flat:
    got = (flat[f"{tower}/MAPHead_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1],
           flat[f"{tower}/MAPHead_0/MlpBlock_0/Dense_0/kernel"].shape[1])
    if got != (heads, mlp_dim):
      raise ValueError(f"{tower}/MAPHead_0 has (num_heads, mlp_dim)={got}, the blocks "
                       f"{(heads, mlp_dim)}; our MAP head shares the tower's sizes.")
  sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  name = next((n for n, s in SIZES.items() if s == tuple(sizes.values())), "mu")
  return dict(variant=name, **sizes)


def _pool(flat, tower, asked, default):
  found = ("map" if f"{tower}/MAPHead_0/probe" in flat
           else "tok" if f"{tower}/cls" in flat else None)
  # 'map' and 'tok' own parameters: they must be present exactly when asked for.
  if asked is not None and asked != found and (found or asked in ("map", "tok")):
    raise ValueError(f"{tower} pool={asked!r}, but the checkpoint's parameters need "
                     f"{found or 'a pool without parameters'!r}.")
  return found or asked or default


def model_config(flat: Mapping[str, np.ndarray], *, image_pool: str | None = None,
                 text_pool: str | None = None, patch: int | None = None,
                 text_padding: str = "none") -> dict:
  """Our `config.model` for a big_vision checkpoint, so that
  `make_model(ConfigDict(model_config(flat)))` has exactly its parameter tree.

  Pools are 'map' (MAPHead_0) or 'tok' (cls) when the parameters say so, else `image_pool`
  (default 'gap') and `text_pool` (default 'last'). Images must have as many patches as
  `img/pos_embedding` (e.g. 224x224 for B/16 with 196 positions); texts L <= max_len tokens
  (with text_padding='none', exactly max_len to match big_vision).
  """
  flat = _canonical(flat)
  kernel = flat["img/embedding/kernel"]  # [p, p, 3, D]
  if kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"non-square patches {kernel.shape[:2]} are not supported.")
  if patch is not None and patch != kernel.shape[0]:
    raise ValueError(f"patch={patch}, but img/embedding/kernel is {kernel.shape}.")
  image = _tower_sizes(flat, "img", "Transformer")
  image.update(variant=f"{image['variant']}/{kernel.shape[0]}",
               pool=_pool(flat, "img", image_pool, "gap"),
               posemb="learn" if "img/pos_embedding" in flat else "sincos2d")
  vocab_size, _ = flat["txt/Embed_0/embedding"].shape
  text = dict(_tower_sizes(flat, "txt", "Encoder_0"), vocab_size=int(vocab_size),
              max_len=int(flat["txt/pos_embedding"].shape[1]),
              pool=_pool(flat, "txt", text_pool, "last"), padding=text_padding)
  if "img/head/kernel" in flat:
    embed_dim = flat["img/head/kernel"].shape[1]
    if flat["txt/head/kernel"].shape[1] != embed_dim:
      raise ValueError(f"img/head and txt/head project to different widths "
                       f"({embed_dim} vs {flat['txt/head/kernel'].shape[1]}).")
    head = "linear"
  elif image["width"] == text["width"]:
    embed_dim, head = image["width"], "none"
  else:
    raise ValueError(f"no heads and different tower widths ({image['width']} vs "
                     f"{text['width']}); the embeddings could not be compared.")
  b = flat.get("b")
  return dict(image=image, text=text, embed_dim=int(embed_dim), head=head,
              t_init=float(np.exp(flat["t"].reshape(()))),
              b_init=None if b is None else float(b.reshape(())))
