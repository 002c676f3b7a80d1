"""Vision transformer image tower and the transformer blocks shared with the text tower.

Follows big_vision's ViT (pre-LayerNorm blocks, xavier-uniform attention/MLP kernels, MAP
pooling head) so that configurations and parameter names read the same.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

IMAGE_POOLS = ("gap", "map", "tok")
POSEMBS = ("learn", "sincos2d")


class MlpBlock(nn.Module):
  """Transformer MLP: [..., D] -> [..., D] through a hidden layer of width `mlp_dim`."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dense = lambda features: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim)(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return dense(d)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: [B, L, D] -> [B, L, D]."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    """`mask`: optional bool [B, 1, 1, L], True where a key may be attended to."""
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True)(y, y, mask=mask)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, train=train)
    return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class _ScannedBlock(Encoder1DBlock):
  """An `Encoder1DBlock` in `nn.scan`'s (carry, output) form; `train` is positional because
  scan broadcasts it like the mask."""

  def __call__(self, x, mask, train):  # pylint: disable=arguments-differ
    return Encoder1DBlock.__call__(self, x, mask, train=train), None


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

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    if self.scan:
      blocks = nn.scan(_ScannedBlock, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      x, _ = blocks(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                    name="encoderblock")(x, mask, train)
    else:
      for i in range(self.depth):
        x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                           name=f"encoderblock_{i}")(x, mask, train=train)
    return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over tokens, [B, L, D] -> [B, D]."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """`mask`: optional bool [B, 1, 1, L], True for tokens the probe may attend to."""
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True)(probe, x, mask=mask)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)
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
    x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                dtype=self.dtype, name="embedding")(image)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    if self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=d ** -0.5), (1, h * w, d))
    else:
      pos = posemb_sincos_2d(h, w, d)
    x = x + pos.astype(x.dtype)
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype, self.scan,
                name="Transformer")(x, train=train)
    if self.pool == "gap":
      pooled = jnp.mean(x, axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.mlp_dim, self.num_heads, self.dtype, name="MAPHead_0")(x)
    else:
      pooled = x[:, 0]
    return pooled, x
