"""Two-tower (image + text) contrastive model, built from `config.model`.

config.model = dict(
    image=dict(variant='mu/4', pool='gap', posemb='learn'),   # + width/depth/mlp_dim/num_heads
    text=dict(variant='mu', vocab_size=..., max_len=16, pool='last'),
                         # + padding='mask' (token 0 masked) or 'none' (big_vision: no mask)
                         # each tower also takes head='' (= model.head; else one of HEADS) and
                         # scan=False (True: blocks under nn.scan, big_vision's stacked layout),
                         # act='gelu' (vit.ACTIVATIONS) and norm_eps=1e-6 (LayerNorm epsilon).
                         # OpenAI CLIP's towers: image.pool='tok', cls_posemb=True,
                         # pre_norm=True, patch_bias=False; text.causal=True, pool='eos',
                         # eos_id (None: highest id), padding='none'; act='quick_gelu',
                         # norm_eps=1e-5 (models/hf.py writes these from a config.json);
                         # image.pixel_mean / pixel_std: the pixel normalisation the model
                         # applies to its [-1, 1] input (CLIP's mean / std; () = none)
    embed_dim=64,        # shared embedding width, independent of the towers' widths
    head='linear',       # projection into it: 'linear', 'mlp' (hidden layer of the tower's
                         # width, GELU) or 'none' (identity; embed_dim = that tower's width).
                         # Released big_vision SigLIP: image.head='none', text.head='linear'.
    head_bias=True,      # False: the projections into embed_dim have no bias (CLIP)
    init_from='',        # a released big_vision .npz or Hugging Face folder whose parameters
                         # replace the random initialisation (fine-tuning; models/released.py);
                         # init_resize_posemb=True resamples its position grid to the images'
    t_init=10.0,         # initial temperature (SigLIP 10; CLIP 1/0.07)
    b_init=-10.0,        # initial logit bias (SigLIP -10); None = no bias (CLIP)
    dtype='float32',     # compute dtype ('bfloat16' on accelerators); parameters stay float32
)
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_fair.models.text import TextTransformer
from siglip_fair.models.variants import OVERRIDABLE, decode_variant
from siglip_fair.models.vit import ACTIVATIONS, NORM_EPS, REMAT_POLICIES, ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS = ("linear", "mlp", "none")


def l2_normalize(z, eps: float = 1e-8):
  return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """Image and text towers with linear heads into a shared, L2-normalised embedding space.

  `apply({'params': p}, image [B, H, W, 3] | None, text i32 [B', L] | None)` returns
  `(zimg f32 [B, D] | None, ztxt f32 [B', D] | None, extras)` with D = embed_dim and
  extras = {'t': temperature (exp of the learnt log), 'b': logit bias (0 without bias),
  'img/pre_logits': [B, width_img], 'txt/pre_logits': [B', width_txt]} (the latter two only
  for towers that ran).
  """
  img: nn.Module
  txt: nn.Module
  embed_dim: int
  head: str = "linear"
  t_init: float = 10.0
  b_init: float | None = -10.0
  dtype: Any = jnp.float32
  # Per-tower overrides of `head` ('' = `head`): big_vision's out_dim=(None, D) is ('none', '').
  image_head: str = ""
  text_head: str = ""
  head_bias: bool = True  # the final Dense of 'linear' / 'mlp' heads (CLIP's have none)
  # `init` returns this checkpoint's parameters (a big_vision .npz or Hugging Face folder)
  # instead of random ones: training then fine-tunes it. '' = random initialisation. The file
  # is read whenever init is traced (a resume's shape check too), so it must stay readable.
  init_from: str = ""
  init_resize_posemb: bool = False  # resample its position grid when the images need another

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):  # pylint: disable=arguments-differ
    """flax's `init`; with `init_from`, the parameters are the checkpoint's (shapes checked
    against the random ones, position grid for the images' size; models/released.py)."""
    variables = super().init(rngs, *args, **kwargs)
    if not self.init_from:
      return variables
    from siglip_fair.models import released  # pylint: disable=g-import-not-at-top
    image = args[0] if args else kwargs.get("image")
    if image is None:
      raise ValueError("model.init_from needs images at init, to know their size.")
    if image.shape[1] != image.shape[2]:
      raise ValueError(f"model.init_from needs square images, got {image.shape[1:3]}.")
    loaded = released.init_params(self.init_from, variables["params"],
                                  image_size=int(image.shape[1]),
                                  resize_posemb=self.init_resize_posemb)
    # The checkpoint's values become constants of the (jitted) init; dtypes as initialised.
    params = jax.tree.map(lambda new, old: jnp.asarray(old, new.dtype), variables["params"],
                          loaded)
    return {**variables, "params": params}

  @nn.compact
  def __call__(self, image=None, text=None, *, train: bool = False):
    log_t = self.param("t", nn.initializers.constant(jnp.log(self.t_init)), ())
    if self.b_init is None:
      b = jnp.zeros((), jnp.float32)
    else:
      b = self.param("b", nn.initializers.constant(self.b_init), ())
    extras = {"t": jnp.exp(log_t), "b": b}
    zimg = ztxt = None
    if image is not None:
      pooled, _ = self.img(image, train=train)
      extras["img/pre_logits"] = pooled
      zimg = l2_normalize(self._project(pooled, "img_head", self.image_head or self.head)
                          .astype(jnp.float32))
    if text is not None:
      pooled, _ = self.txt(text, train=train)
      extras["txt/pre_logits"] = pooled
      ztxt = l2_normalize(self._project(pooled, "txt_head", self.text_head or self.head)
                          .astype(jnp.float32))
    return zimg, ztxt, extras

  def _project(self, pooled, name, head):
    if head == "none":
      if pooled.shape[-1] != self.embed_dim:
        raise ValueError(f"model.head='none' ({name[:3]} tower) needs embed_dim "
                         f"({self.embed_dim}) equal to the tower width ({pooled.shape[-1]}); "
                         "use head='linear' otherwise.")
      return pooled
    if head == "mlp":
      hidden = nn.Dense(pooled.shape[-1], dtype=self.dtype, name=f"{name}_hidden")(pooled)
      pooled = nn.gelu(hidden)
    return nn.Dense(self.embed_dim, use_bias=self.head_bias, dtype=self.dtype, name=name)(pooled)


def _sizes(tower_cfg, *, need_patch: bool) -> dict:
  if "variant" not in tower_cfg:
    raise ValueError("model.image / model.text need a 'variant', e.g. 'B/16' / 'B'.")
  overrides = {k: tower_cfg.get(k) for k in OVERRIDABLE}
  return decode_variant(tower_cfg["variant"], overrides=overrides, need_patch=need_patch)


def make_model(config) -> TwoTower:
  """Builds the two-tower model from `config.model` (see the module docstring)."""
  dtype_name = config.get("dtype", "float32")
  if dtype_name not in DTYPES:
    raise ValueError(f"model.dtype={dtype_name!r}; use one of {sorted(DTYPES)}.")
  dtype = DTYPES[dtype_name]
  for key in ("image", "text", "embed_dim"):
    if key not in config:
      raise ValueError(f"config.model.{key} is required.")
  embed_dim = config["embed_dim"]
  if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
    raise ValueError(f"config.model.embed_dim={embed_dim!r} must be a positive integer (the "
                     "width of the shared embedding space), e.g. --config.model.embed_dim=64.")
  icfg, tcfg = config["image"], config["text"]
  if tcfg.get("vocab_size") is None:
    raise ValueError("config.model.text.vocab_size is required (the tokenizer's vocabulary).")
  pixel_mean, pixel_std = (tuple(float(v) for v in icfg.get(k) or ())
                           for k in ("pixel_mean", "pixel_std"))
  if (pixel_mean or pixel_std) and (len(pixel_mean), len(pixel_std)) != (3, 3):
    raise ValueError(f"config.model.image.pixel_mean={pixel_mean} / pixel_std={pixel_std} need "
                     "3 values each (RGB), or () for none.")
  img = ViT(**_sizes(icfg, need_patch=True), pool=icfg.get("pool", "gap"),
            posemb=icfg.get("posemb", "learn"), dropout=icfg.get("dropout", 0.0), dtype=dtype,
            scan=bool(icfg.get("scan", False)), **_block_options(icfg, "image"),
            cls_posemb=bool(icfg.get("cls_posemb", False)),
            pre_norm=bool(icfg.get("pre_norm", False)),
            patch_bias=bool(icfg.get("patch_bias", True)), pixel_mean=pixel_mean,
            pixel_std=pixel_std)
  eos_id = tcfg.get("eos_id")
  txt = TextTransformer(**_sizes(tcfg, need_patch=False), vocab_size=int(tcfg["vocab_size"]),
                        max_len=int(tcfg.get("max_len", 64)), pool=tcfg.get("pool", "last"),
                        padding=tcfg.get("padding", "mask"),
                        dropout=tcfg.get("dropout", 0.0), dtype=dtype,
                        scan=bool(tcfg.get("scan", False)), **_block_options(tcfg, "text"),
                        causal=bool(tcfg.get("causal", False)),
                        eos_id=None if eos_id is None else int(eos_id))
  t_init = float(config.get("t_init", 10.0))
  if t_init <= 0:
    raise ValueError(f"config.model.t_init must be > 0 (it is a temperature), got {t_init}.")
  b_init = config.get("b_init", -10.0)
  head = config.get("head", "linear")
  if head not in HEADS:
    raise ValueError(f"config.model.head={head!r}; use one of {HEADS}.")
  tower_heads = {}
  for name, tower_cfg in (("image", icfg), ("text", tcfg)):
    tower_heads[name] = tower_cfg.get("head") or ""
    if tower_heads[name] and tower_heads[name] not in HEADS:
      raise ValueError(f"config.model.{name}.head={tower_heads[name]!r}; use one of {HEADS} "
                       "or '' (= config.model.head).")
  return TwoTower(img=img, txt=txt, embed_dim=int(config["embed_dim"]), head=head, t_init=t_init,
                  b_init=None if b_init is None else float(b_init), dtype=dtype,
                  image_head=tower_heads["image"], text_head=tower_heads["text"],
                  head_bias=bool(config.get("head_bias", True)),
                  init_from=str(config.get("init_from", "") or ""),
                  init_resize_posemb=bool(config.get("init_resize_posemb", False)))


def _block_options(tower_cfg, name: str) -> dict:
  """The transformer-block options of a tower config: MLP activation, LayerNorm epsilon and
  rematerialisation."""
  act = tower_cfg.get("act", "gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"config.model.{name}.act={act!r}; use one of {tuple(ACTIVATIONS)}.")
  norm_eps = float(tower_cfg.get("norm_eps", NORM_EPS))
  if not norm_eps > 0:
    raise ValueError(f"config.model.{name}.norm_eps={norm_eps} must be > 0.")
  remat = tower_cfg.get("remat", "none")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.{name}.remat={remat!r}; use one of "
                     f"{tuple(REMAT_POLICIES)}.")
  return dict(act=act, norm_eps=norm_eps, remat=remat)


def check_config(config, image_size: int) -> TwoTower:
  """Every check of `config.model` that otherwise fails only once the model first runs (pools,
  position embeddings, padding, patch size against the image size); returns the model."""
  from siglip_fair.models.text import TEXT_PADDINGS, TEXT_POOLS  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.vit import IMAGE_POOLS, POSEMBS  # pylint: disable=g-import-not-at-top
  model = make_model(config)
  for field, value, allowed in (
      ("image.pool", model.img.pool, IMAGE_POOLS), ("image.posemb", model.img.posemb, POSEMBS),
      ("text.pool", model.txt.pool, TEXT_POOLS), ("text.padding", model.txt.padding,
                                                   TEXT_PADDINGS)):
    if value not in allowed:
      raise ValueError(f"config.model.{field}={value!r}; use one of {allowed}.")
  if model.img.cls_posemb and (model.img.pool, model.img.posemb) != ("tok", "learn"):
    raise ValueError("config.model.image.cls_posemb=True needs image.pool='tok' and "
                     "image.posemb='learn'.")
  patch = model.img.patch_size
  if image_size % patch[0] or image_size % patch[1]:
    raise ValueError(
        f"world.image_size={image_size} is not a multiple of the patch size {patch[0]} of "
        f"model.image.variant={config.image.variant!r}; use a resolution divisible by it (e.g. "
        f"--config.world.image_size={max(patch[0], image_size // patch[0] * patch[0])}) or "
        "another patch size.")
  return model


def embed_fns(model: TwoTower, mesh=None) -> tuple[Callable, Callable]:
  """Jitted single-tower embedding functions for evaluators.

  Returns (embed_images(params, images [B, H, W, 3]) -> f32 [B, D],
           embed_texts(params, tokens i32 [B, L]) -> f32 [B, D]).

  With a `mesh` the rows are split over its batch axes (`train.sharding.batch_axes`), so
  evaluation runs data-parallel on every device with parameters wherever the train state keeps
  them (replicated or FSDP-sharded); B need not divide by the device count (rows are padded
  and the padding dropped). Call with a fixed B so each tower compiles once.
  """
  @jax.jit
  def embed_images(params, images):
    return model.apply({"params": params}, images, None)[0]

  @jax.jit
  def embed_texts(params, tokens):
    return model.apply({"params": params}, None, tokens)[1]

  if mesh is None:
    return embed_images, embed_texts
  from siglip_fair.train.sharding import batch_sharding  # pylint: disable=g-import-not-at-top
  sharding = batch_sharding(mesh)
  size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(sharding.spec[0])]))

  def on_mesh(fn):
    def sharded(params, x):
      x = np.asarray(x)
      pad = -len(x) % size
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      out = fn(params, jax.device_put(x, sharding))  # explicit: rows split over the devices
      return out[:len(out) - pad] if pad else out
    return sharded

  return on_mesh(embed_images), on_mesh(embed_texts)


def temperature(params) -> float:
  """The learnt logit scale t = exp(params['t']) of a `TwoTower`'s parameters."""
  if "t" not in params:
    raise ValueError(f"params have no 't' (the log temperature); top-level keys: "
                     f"{sorted(params)}. Are these a TwoTower's params?")
  return float(np.exp(np.asarray(jax.device_get(params["t"]), np.float64)))
