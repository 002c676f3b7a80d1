"""Two-tower parameters in big_vision's SigLIP `.npz` layout, both ways.

big_vision keeps the projections inside the towers (`img/head`, `txt/head`; either may be
absent: released SigLIP / SigLIP 2 have `txt/head` only, out_dim=(None, D)), names the text
embedding `txt/Embed_0`, stores `t`/`b` with shape (1,) and may stack a tower's blocks along a
leading depth axis (`encoderblock/...`, trained with scan=True; SigLIP 2 in both towers).
Everything else has the same names here. Checkpoints hold flat '/'-joined keys, optionally
under `params/` (train state).

  flat = load_npz(path)
  check_tokenizer(flat, tokenizer.vocab_size, max_len)
  cfg = model_config(flat, scan=None)            # per-tower heads, pools, sizes, layout
  params = from_big_vision(flat, scan=None, image_size=384, resize_posemb=True)
  check_params(ConfigDict(cfg), params, 384)     # names any key / shape that does not fit
  save_npz(path, params, scan=True)              # big_vision scan=True model's layout
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

from siglip_fair.io import atomic_savez
from siglip_fair.models import trees
from siglip_fair.models.posemb import resize_posemb, square_grid
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
_TOWER_NAMES = {"img": "image", "txt": "text"}
_BLOCK_RE = re.compile(r"^(img/Transformer|txt/Encoder_0)/encoderblock_(\d+)/")


_flatten = trees.flatten_to_host


def _strip_params(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  if any(k.startswith("params/") for k in flat):
    # Train checkpoints also hold optimizer state etc. beside `params/`.
    return {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
  return dict(flat)


def _check_layout(flat: Mapping[str, np.ndarray]) -> None:
  """An 'unknown layout' error when nothing looks like a big_vision two-tower tree at all
  (a Hugging Face file, a single-tower ViT, ...), naming the keys that did not match."""
  if any(k.startswith(("img/", "txt/")) for k in flat):
    return
  keys = sorted(k for k in flat if k not in ("t", "b"))
  raise ValueError(
      f"unknown checkpoint layout: expected big_vision two-tower keys 'img/...', 'txt/...' and "
      f"'t' (optionally under 'params/'), but these keys did not match: {keys[:12]}"
      f"{' ...' if len(keys) > 12 else ''} ({len(keys)} keys).")


def _unstack(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scan-stacked `<stack>/encoderblock/<k>` [depth, ...] -> per-layer `encoderblock_<i>/<k>`."""
  out = {}
  for key, value in flat.items():
    tower, sep, rest = key.partition("/encoderblock/")
    if not sep:
      out[key] = value
      continue
    if any(k.startswith(f"{tower}/encoderblock_") for k in flat):
      raise ValueError(f"{tower!r} has both scan-stacked 'encoderblock/' and per-layer "
                       "'encoderblock_<i>/' keys; expected one layout.")
    for i, layer in enumerate(np.asarray(value)):
      out[f"{tower}/encoderblock_{i}/{rest}"] = layer
  return out


def _stack(flat: Mapping[str, np.ndarray], towers) -> dict[str, np.ndarray]:
  """Per-layer blocks of the `towers` ('img', 'txt') -> big_vision's scan=True layout."""
  out, layers = {}, {}
  for key, value in flat.items():
    m = _BLOCK_RE.match(key)
    if m and m[1][:3] in towers:
      layers.setdefault((m[1], key[m.end():]), {})[int(m[2])] = value
    else:
      out[key] = value
  for (stack, rest), by_depth in layers.items():
    out[f"{stack}/encoderblock/{rest}"] = np.stack([by_depth[i] for i in range(len(by_depth))])
  return out


def _scanned(flat: Mapping[str, np.ndarray]) -> tuple[bool, bool]:
  """(image, text): whether each tower's blocks are stored scan-stacked."""
  return tuple(any(k.startswith(f"{tower}/{stack}/encoderblock/") for k in flat)
               for tower, (stack, _) in _TOWERS.items())


def _scan_towers(scan, flat) -> set[str]:
  """`scan` (bool, (image, text) or None = as stored in `flat`) -> the towers to stack."""
  if scan is None:
    scan = _scanned(flat)
  if isinstance(scan, (bool, np.bool_)):
    scan = (scan, scan)
  if len(scan) != 2:
    raise ValueError(f"scan={scan!r}; use a bool, (image, text) bools, or None.")
  return {tower for tower, s in zip(_TOWERS, scan) if s}


def _canonical(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips `params/` and un-stacks scan-style blocks; then checks the key set."""
  flat = _strip_params(flat)
  _check_layout(flat)
  out = {k: np.asarray(v) for k, v in _unstack(flat).items()}
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
  for tower, (stack, always) in _TOWERS.items():
    keys |= {f"{tower}/{k}" for k in always}
    keys |= {f"{tower}/{k}" for k in ("pos_embedding", "cls") if f"{tower}/{k}" in flat}
    depth = 1 + max((int(m[2]) for k in flat if (m := _BLOCK_RE.match(k))
                     and m[1] == f"{tower}/{stack}"), default=0)
    keys |= {f"{tower}/{stack}/encoderblock_{i}/{k}" for i in range(depth) for k in _BLOCK}
    keys |= {f"{tower}/{stack}/{k}" for k in _norm("encoder_norm")}
    if has(f"{tower}/MAPHead_0/"):
      keys |= {f"{tower}/MAPHead_0/{k}" for k in _MAP}
    # Heads are per tower: released SigLIP has `txt/head` but no `img/head` (out_dim=(None, D)).
    if has(f"{tower}/head/"):
      keys |= {f"{tower}/head/kernel", f"{tower}/head/bias"}
  return keys


def _bv_name(key: str) -> str:
  """Our flat parameter name -> big_vision's."""
  top, _, rest = key.partition("/")
  if top in ("img_head_hidden", "txt_head_hidden"):
    raise ValueError("model.head='mlp' has no big_vision equivalent; only 'linear' and "
                     "'none' heads can be exported.")
  if top in ("img_head", "txt_head"):
    return f"{top[:3]}/head/{rest}"
  if key.startswith("txt/embedding/"):
    return "txt/Embed_0/" + key[len("txt/embedding/"):]
  if (top in ("t", "b") and not rest) or top in ("img", "txt"):
    return key
  raise ValueError(f"unexpected parameter {key!r}; are these a TwoTower's params?")


def to_big_vision(params, *, scan=None) -> dict[str, np.ndarray]:
  """Our `TwoTower` params -> flat big_vision keys `params/...` (t, b with shape (1,)).

  scan: True / False / (image, text) writes those towers' blocks scan-stacked
  (`encoderblock/<k>` [depth, ...], big_vision scan=True) or per layer (`encoderblock_<i>/`);
  None keeps each tower's layout as in `params` (our model.<tower>.scan).
  """
  flat = {}
  for key, value in _flatten(params).items():
    flat[_bv_name(key)] = value.reshape(1) if key in ("t", "b") else value
  towers = _scan_towers(scan, flat)
  flat = _stack(_canonical(flat), towers)  # _canonical: what we write must load back
  return {f"params/{k}": v for k, v in flat.items()}


def from_big_vision(flat: Mapping[str, np.ndarray], *, scan=False,
                    image_size: int | tuple[int, int] | None = None,
                    resize_posemb: bool = False, posemb_method: str = "zoom") -> dict:
  """Flat big_vision keys (with or without `params/`, per-layer or scan-stacked blocks) ->
  our nested params (np arrays; t, b scalars). Raises ValueError on missing/unknown keys.

  scan: the block layout of the model that will use the params (model.<tower>.scan): False
  (default) per layer, True / (image, text) stacked, None as stored in `flat`.
  image_size: the resolution the model will run at (px, or (H, W)); when its patch grid differs
  from `img/pos_embedding`'s, resize_posemb=True resamples the grid (posemb.resize_posemb with
  `posemb_method`), otherwise the error names both grids. None leaves it as stored.
  """
  towers = _scan_towers(scan, _strip_params(flat))
  canonical = _canonical(flat)
  if image_size is not None and "img/pos_embedding" in canonical:
    canonical["img/pos_embedding"] = _posemb_at(canonical, image_size, resize_posemb,
                                                posemb_method)
  params: dict = {}
  for key, value in _stack(canonical, towers).items():
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


def _posemb_at(flat, image_size, resize: bool, method: str) -> np.ndarray:
  """`img/pos_embedding` for images of `image_size` (see from_big_vision)."""
  posemb = flat["img/pos_embedding"]
  h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  p = flat["img/embedding/kernel"].shape[0]
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the checkpoint's patch size {p} "
                     "(img/embedding/kernel).")
  grid, n = (h // p, w // p), posemb.shape[1]
  if grid[0] * grid[1] == n and square_grid(n) in (None, grid[0]):
    return posemb
  g = square_grid(n)
  have = f"{g}x{g}" if g else f"{n}-position"
  if not resize:
    raise ValueError(
        f"img/pos_embedding is a {have} patch grid ({g * p if g else '?'} px at patch {p}), "
        f"but {h}x{w} px images need a {grid[0]}x{grid[1]} grid; pass resize_posemb=True to "
        f"resample it (big_vision's high-res fine-tuning) or use images of the checkpoint's "
        f"resolution.")
  return resize_posemb(posemb, grid, method)


def image_size(flat: Mapping[str, np.ndarray]) -> int | None:
  """The resolution (px, square) of a checkpoint's learnt position grid: grid side x patch;
  None without a learnt table or for a grid that is not square."""
  flat = _strip_params(flat)
  if "img/pos_embedding" not in flat:
    return None
  grid = square_grid(flat["img/pos_embedding"].shape[1])
  return None if grid is None else grid * int(flat["img/embedding/kernel"].shape[0])


def check_tokenizer(flat: Mapping[str, np.ndarray], vocab_size: int,
                    max_len: int | None = None) -> None:
  """Raises if a tokenizer with `vocab_size` pieces (and rows of `max_len` tokens) cannot feed
  this checkpoint's text tower: ids past the embedding table would be silently clamped by the
  lookup, and rows longer than `txt/pos_embedding` have no positions."""
  flat = _strip_params(flat)
  _check_layout(flat)
  rows, width = flat["txt/Embed_0/embedding"].shape
  if int(vocab_size) > rows:
    raise ValueError(f"the tokenizer has {vocab_size} pieces but the checkpoint's "
                     f"txt/Embed_0/embedding has only {rows} rows; token ids >= {rows} have no "
                     "embedding. Use the tokenizer the checkpoint was trained with.")
  positions = flat["txt/pos_embedding"].shape[1]
  if max_len is not None and int(max_len) > positions:
    raise ValueError(f"the tokenizer writes {max_len} tokens per text but the checkpoint's "
                     f"txt/pos_embedding has {positions} positions; use max_len <= {positions}.")


def save_npz(path: str | os.PathLike, params, *, scan=None) -> str:
  """Writes our params as a big_vision `.npz` (atomically); returns the path. `scan` as in
  `to_big_vision`: pass the target big_vision model's scan setting (True for SigLIP 2)."""
  return atomic_savez(path, **to_big_vision(params, scan=scan))


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


def _heads(flat, image, text) -> tuple[int, dict]:
  """(embed_dim, {'image': head, 'text': head}) from which towers have a `head` Dense."""
  dims, heads = {}, {}
  for tower, sizes in (("img", image), ("txt", text)):
    kernel = flat.get(f"{tower}/head/kernel")
    heads[_TOWER_NAMES[tower]] = "none" if kernel is None else "linear"
    dims[tower] = (f"{tower}/head/kernel" if kernel is not None else f"{tower} tower width",
                   sizes["width"] if kernel is None else kernel.shape[1])
  if dims["img"][1] != dims["txt"][1]:
    raise ValueError(f"the towers' embeddings have different tower widths: {dims['img'][0]} "
                     f"gives {dims['img'][1]}, {dims['txt'][0]} gives {dims['txt'][1]}; they "
                     "could not be compared.")
  return int(dims["img"][1]), heads


def model_config(flat: Mapping[str, np.ndarray], *, image_pool: str | None = None,
                 text_pool: str | None = None, patch: int | None = None,
                 text_padding: str = "none", scan=False) -> dict:
  """Our `config.model` for a big_vision checkpoint, so that
  `make_model(ConfigDict(model_config(flat)))` has exactly its parameter tree.

  Pools are 'map' (MAPHead_0) or 'tok' (cls) when the parameters say so, else `image_pool`
  (default 'gap') and `text_pool` (default 'last'). Heads are per tower: a tower without
  `<tower>/head` gets head='none' (its pooled output is the embedding; released SigLIP has no
  image head). `scan` as in `from_big_vision` (pass the same value to both). Images must have
  as many patches as `img/pos_embedding` (e.g. 224x224 for B/16 with 196 positions) unless
  from_big_vision resizes it; texts L <= max_len tokens (with text_padding='none', exactly
  max_len to match big_vision).
  """
  towers = _scan_towers(scan, _strip_params(flat))
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
  embed_dim, heads = _heads(flat, image, text)
  image.update(head=heads["image"], scan="img" in towers)
  text.update(head=heads["text"], scan="txt" in towers)
  b = flat.get("b")
  return dict(image=image, text=text, embed_dim=embed_dim,
              head="linear" if "linear" in heads.values() else "none",
              t_init=float(np.exp(flat["t"].reshape(()))),
              b_init=None if b is None else float(b.reshape(())))


def check_params(config, params, image_size: int | tuple[int, int]) -> None:
  """Raises, naming the keys (big_vision names), if `params` (from `from_big_vision`) do not
  have exactly the tree of `make_model(config)` run on `image_size` images: e.g. a config with
  an image head for a released SigLIP file, which has none."""
  from siglip_fair.models.two_tower import make_model  # pylint: disable=g-import-not-at-top
  h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  trees.check_fit(make_model(config), params, (h, w), what="the checkpoint", name=_bv_name)
