"""Target classifiers of the CLIP-debias harness: a small CNN (tests, CPU demos) and ResNet-18.

ResNet-18 follows torchvision's layout and initialisation (same parameter count), since the
debiasing literature reports its numbers with that network; `small_images` swaps the 7x7/2
stem and max-pool for a 3x3/1 stem, the usual choice for 32x32 inputs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class SmallCNN(nn.Module):
  """Three conv blocks (width, 2 width, 4 width) with stride-2 pooling, GAP, linear head."""
  num_classes: int
  width: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # no batch statistics: the same function in training and evaluation
    x = x.astype(self.dtype)
    for i in range(3):
      x = nn.Conv(self.width * 2 ** i, (3, 3), dtype=self.dtype, kernel_init=_KAIMING)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean((1, 2))).astype(jnp.float32)


class _Block(nn.Module):
  width: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype)
    conv = lambda w, k, s: nn.Conv(w, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2,
                                   use_bias=False, dtype=self.dtype, kernel_init=_KAIMING)
    y = nn.relu(norm()(conv(self.width, 3, self.stride)(x)))
    y = norm()(conv(self.width, 3, 1)(y))
    if x.shape[-1] != self.width or self.stride != 1:
      x = norm()(conv(self.width, 1, self.stride)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 (He et al. 2016) with BatchNorm; logits float32 [B, num_classes]."""
  num_classes: int
  width: int = 64
  small_images: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = x.astype(self.dtype)
    k, s = (3, 1) if self.small_images else (7, 2)
    x = nn.Conv(self.width, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                dtype=self.dtype, kernel_init=_KAIMING)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)(x))
    if not self.small_images:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    for i, stride in enumerate((1, 2, 2, 2)):
      for j in range(2):
        x = _Block(self.width * 2 ** i, stride if j == 0 else 1, self.dtype)(x, train)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean((1, 2))).astype(jnp.float32)


NETS = {"small_cnn": SmallCNN, "resnet18": ResNet18}


def make_net(name: str, num_classes: int, **kwargs) -> nn.Module:
  if name not in NETS:
    raise ValueError(f"target.net={name!r}; expected one of {sorted(NETS)}.")
  return NETS[name](num_classes=num_classes, **kwargs)


def init_variables(net: nn.Module, key: jax.Array, image_shape) -> dict:
  """Flax variables ({'params'} and, for ResNet-18, {'batch_stats'}) for [H, W, 3] images."""
  return dict(net.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))


def apply(net: nn.Module, variables: dict, images, *, train: bool):
  """(logits [B, C], batch_stats after the call or None): BatchNorm statistics are updated
  only in training."""
  if train and "batch_stats" in variables:
    logits, updates = net.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return net.apply(variables, images, train=train), variables.get("batch_stats")


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
