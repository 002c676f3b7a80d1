"""Vision transformer image tower and the transformer blocks shared with the text tower.

Follows big_vision's ViT (pre-LayerNorm blocks, xavier-uniform attention/MLP kernels, MAP
pooling head) so that configurations and parameter names read the same. Options that are off by
default express OpenAI CLIP's image tower as well (class token with its own position embedding,
a LayerNorm before the blocks, no patch-embedding bias, quick-GELU, LayerNorm epsilon 1e-5) and
its pixel normalisation (`pixel_mean` / `pixel_std`: images still come in [-1, 1]).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_fair.data.preprocess import unit_range_affine

IMAGE_POOLS = ("gap", "map", "tok")
POSEMBS = ("learn", "sincos2d")


def quick_gelu(x):
  """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x)."""
  return x * nn.sigmoid(1.702 * x)


# 'gelu' is the tanh approximation (flax's default, big_vision; HF 'gelu_pytorch_tanh');
# 'gelu_erf' the exact one (HF 'gelu'); 'quick_gelu' OpenAI CLIP's.
ACTIVATIONS = {"gelu": nn.gelu,
               "gelu_erf": lambda x: nn.gelu(x, approximate=False),
               "quick_gelu": quick_gelu}
NORM_EPS = 1e-6  # flax's LayerNorm default (big_vision, SigLIP); OpenAI CLIP uses 1e-5


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"model.<tower>.act={name!r}; use one of {tuple(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Transformer MLP: [..., D] -> [..., D] through a hidden layer of width `mlp_dim`."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = "gelu"  # a key of ACTIVATIONS

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dense = lambda features: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = activation(self.act)(dense(self.mlp_dim)(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return dense(d)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: [B, L, D] -> [B, L, D]."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = "gelu"
  norm_eps: float = NORM_EPS

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    """`mask`: optional bool [B, 1, 1 or L, L], True where a query may attend to a key."""
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True)(y, y, mask=mask)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act)(y, train=train)
    return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class _ScannedBlock(Encoder1DBlock):
  """An `Encoder1DBlock` in `nn.scan`'s (carry, output) form; `train` is positional because
  scan broadcasts it like the mask."""

  def __call__(self, x, mask, train):  # pylint: disable=arguments-differ
    return Encoder1DBlock.__call__(self, x, mask, train=train), None


class _PositionalBlock(Encoder1DBlock):
  """An `Encoder1DBlock` with `train` positional, so that `nn.remat` can hold it static."""

  def __call__(self, x, mask, train):  # pylint: disable=arguments-differ
    return Encoder1DBlock.__call__(self, x, mask, train=train)


# model.<tower>.remat: which activations of a block the backward pass keeps; the rest it
# recomputes (activation memory for compute). 'full' keeps only each block's input, 'dots' also
# the outputs of its matrix multiplications.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# Index of `train` in the blocks' (self, x, mask, train) calls, for nn.remat.
_TRAIN_ARG = 3


class Encoder(nn.Module):
  """`depth` transformer blocks and a final LayerNorm: [B, L, D] -> [B, L, D].

  scan=False names the blocks `encoderblock_<i>`; scan=True runs one block under `nn.scan`
  (compiles once whatever the depth), its parameters stacked as `encoderblock/...` with a
  leading [depth] axis: big_vision's two layouts, the same function of the same numbers.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = False
  act: str = "gelu"
  norm_eps: float = NORM_EPS
  remat: str = "none"

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; use one of {tuple(REMAT_POLICIES)}.")
    block = (self.mlp_dim, self.num_heads, self.dropout, self.dtype, self.act, self.norm_eps)
    remat = self.remat != "none"
    if self.scan:
      cls = _ScannedBlock
      if remat:  # prevent_cse=False: scan already keeps XLA from merging the recomputation
        cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat], prevent_cse=False,
                       static_argnums=(_TRAIN_ARG,))
      blocks = nn.scan(cls, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      x, _ = blocks(*block, name="encoderblock")(x, mask, train)
    elif remat:
      cls = nn.remat(_PositionalBlock, policy=REMAT_POLICIES[self.remat],
                     static_argnums=(_TRAIN_ARG,))
      for i in range(self.depth):
        x = cls(*block, name=f"encoderblock_{i}")(x, mask, train)
    else:
      for i in range(self.depth):
        x = Encoder1DBlock(*block, name=f"encoderblock_{i}")(x, mask, train=train)
    return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over tokens, [B, L, D] -> [B, D]."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  act: str = "gelu"
  norm_eps: float = NORM_EPS

  @nn.compact
  def __call__(self, x, mask=None):
    """`mask`: optional bool [B, 1, 1, L], True for tokens the probe may attend to."""
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True)(probe, x, mask=mask)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, act=self.act)(y)
    return x[:, 0]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (MoCo v3 / big_vision), [1, h*w, width]."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need width % 4 == 0, got width={width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class ViT(nn.Module):
  """Image tower: images f32 [B, H, W, 3] -> (pooled [B, width], tokens [B, N, width]).

  H and W must be multiples of the patch size; N = (H/p)(W/p) (+1 with pool='tok').
  OpenAI CLIP's tower is pool='tok', cls_posemb=True, pre_norm=True, patch_bias=False,
  act='quick_gelu', norm_eps=1e-5; the defaults are big_vision's.
  """
  patch_size: tuple[int, int]
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = "gap"
  posemb: str = "learn"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = False
  act: str = "gelu"  # MLP activation, a key of ACTIVATIONS
  norm_eps: float = NORM_EPS  # every LayerNorm's epsilon
  remat: str = "none"  # per-block rematerialisation: REMAT_POLICIES
  # The class token (pool='tok') is added before the learnt position embedding, which then has
  # N + 1 rows, row 0 the class token's (CLIP); False: the token has no position (big_vision).
  cls_posemb: bool = False
  pre_norm: bool = False  # a LayerNorm ('pre_norm') on the tokens before the blocks (CLIP)
  patch_bias: bool = True  # False: the patch embedding has no bias (CLIP)
  # Images come in [-1, 1] (p / 127.5 - 1 of uint8 pixels p) everywhere in the project; a model
  # trained on (p / 255 - mean) / std gets those values by this exact affine map first (OpenAI
  # CLIP's mean / std). () = none (big_vision and SigLIP were trained on [-1, 1]).
  pixel_mean: tuple[float, ...] = ()
  pixel_std: tuple[float, ...] = ()

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    if self.pool not in IMAGE_POOLS:
      raise ValueError(f"model.image.pool={self.pool!r}; use one of {IMAGE_POOLS}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"model.image.posemb={self.posemb!r}; use one of {POSEMBS}.")
    ph, pw = self.patch_size
    if image.ndim != 4 or image.shape[1] % ph or image.shape[2] % pw:
      raise ValueError(
          f"images must be [B, H, W, C] with H, W multiples of the patch size {self.patch_size}; "
          f"got shape {image.shape}.")
    if self.cls_posemb and (self.pool, self.posemb) != ("tok", "learn"):
      raise ValueError("model.image.cls_posemb=True needs pool='tok' and posemb='learn' (a "
                       f"learnt position for the class token); got pool={self.pool!r}, "
                       f"posemb={self.posemb!r}.")
    if self.pixel_mean or self.pixel_std:
      affine = unit_range_affine(self.pixel_mean or (0.5,) * 3, self.pixel_std or (0.5,) * 3)
      if affine is not None:
        image = image * affine[0] + affine[1]
    x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, name="embedding")(image)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)

    def tok(x):  # [B, N, D] -> [B, 1 + N, D], the class token first
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      return jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

    # Parameters are created in the order of the default path (pos_embedding, then cls): the
    # init RNG is drawn per creation, so existing models initialise bit for bit as before.
    if self.cls_posemb:
      x = tok(x)
    if self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=d ** -0.5),
                       (1, x.shape[1], d))
    else:
      pos = posemb_sincos_2d(h, w, d)
    x = x + pos.astype(x.dtype)
    if self.pool == "tok" and not self.cls_posemb:
      x = tok(x)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="pre_norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype, self.scan,
                self.act, self.norm_eps, self.remat, name="Transformer")(x, train=train)
    if self.pool == "gap":
      pooled = jnp.mean(x, axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.mlp_dim, self.num_heads, self.dtype, self.act, self.norm_eps,
                       name="MAPHead_0")(x)
    else:
      pooled = x[:, 0]
    return pooled, x
