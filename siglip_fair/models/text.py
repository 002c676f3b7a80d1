"""Text transformer tower.

With padding='mask' (the default) token id 0 is padding: it is never attended to nor pooled.
padding='none' reproduces big_vision's text tower, which has no attention mask and pools over
every position (its SigLIP tokenizer pads with EOS, so position -1 is an EOS token).
OpenAI CLIP's text tower is causal=True, pool='eos', padding='none' (id 0 is a real token in its
vocabulary; under the causal mask nothing after the EOS token reaches it), act='quick_gelu',
norm_eps=1e-5.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from siglip_fair.models.vit import NORM_EPS, Encoder, MAPHead

TEXT_POOLS = ("last", "first", "map", "gap", "eos")
TEXT_PADDINGS = ("mask", "none")


class TextTransformer(nn.Module):
  """Text tower: tokens i32 [B, L] (L <= max_len) -> (pooled [B, width], tokens [B, L, width]).

  Pooling: 'last' = the last non-padding token (an EOS-style summary; the tokenizer pads on the
  right), 'first' = position 0, 'gap' = mean over non-padding tokens, 'map' = attention pooling
  over non-padding tokens, 'eos' = the first token equal to `eos_id` (position 0 when a row has
  none), or with eos_id=None the first token of the highest id (OpenAI CLIP: its end-of-text
  token is the last of the vocabulary; Hugging Face's CLIPTextModel with eos_token_id == 2).
  With padding='none' no token counts as padding: nothing is masked, 'last' is position L-1,
  'gap' and 'map' cover all L positions (big_vision semantics). causal=True lets position i
  attend to positions <= i only (on top of the padding mask).
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = "last"
  padding: str = "mask"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  scan: bool = False  # blocks under nn.scan, stacked parameters (see vit.Encoder)
  causal: bool = False  # each position attends to itself and earlier positions only (CLIP)
  eos_id: int | None = None  # pool='eos': the end-of-text id (None: the highest id of the row)
  act: str = "gelu"  # MLP activation, a key of vit.ACTIVATIONS
  norm_eps: float = NORM_EPS  # every LayerNorm's epsilon
  remat: str = "none"  # per-block rematerialisation (vit.REMAT_POLICIES)

  @nn.compact
  def __call__(self, text, *, train: bool = False):
    if self.pool not in TEXT_POOLS:
      raise ValueError(f"model.text.pool={self.pool!r}; use one of {TEXT_POOLS}.")
    if text.ndim != 2 or text.shape[1] > self.max_len:
      raise ValueError(
          f"text must be int tokens [B, L] with L <= model.text.max_len={self.max_len}; "
          f"got shape {text.shape}.")
    if self.padding not in TEXT_PADDINGS:
      raise ValueError(f"model.text.padding={self.padding!r}; use one of {TEXT_PADDINGS} "
                       "('none' for big_vision checkpoints).")
    masked = self.padding == "mask"
    valid = text != 0
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                 embedding_init=nn.initializers.normal(stddev=self.width ** -0.5),
                 name="embedding")(text)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=self.width ** -0.5),
                     (1, self.max_len, self.width))
    x = x + pos[:, :text.shape[1]].astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    # Only keys are masked: padded query rows still see the valid tokens, so nothing is NaN even
    # for an all-padding (empty) caption, and padded positions are dropped at pooling.
    keys = valid[:, None, None, :] if masked else None
    mask = keys
    if self.causal:
      length = text.shape[1]
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L(q), L(k)]
      mask = causal if keys is None else keys & causal
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype, self.scan,
                self.act, self.norm_eps, self.remat, name="Encoder_0")(x, mask, train=train)
    if self.pool == "eos":
      # argmax returns the first maximum: the first EOS (or, with eos_id=None, the first token
      # of the row's highest id), as torch's argmax in Hugging Face's CLIPTextModel.
      target = text == self.eos_id if self.eos_id is not None else text
      position = jnp.argmax(target.astype(jnp.int32), axis=1)
      pooled = jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
    elif self.pool == "first":
      pooled = x[:, 0]
    elif self.pool == "last" and not masked:
      pooled = x[:, -1]
    elif self.pool == "last":
      positions = jnp.arange(text.shape[1])
      last = jnp.max(jnp.where(valid, positions, 0), axis=1)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.pool == "gap" and not masked:
      pooled = jnp.mean(x, axis=1)
    elif self.pool == "gap":
      count = jnp.maximum(valid.sum(axis=1, keepdims=True), 1).astype(x.dtype)
      pooled = jnp.sum(x * valid[..., None].astype(x.dtype), axis=1) / count
    else:
      pooled = MAPHead(self.mlp_dim, self.num_heads, self.dtype, self.act, self.norm_eps,
                       name="MAPHead_0")(x, keys)  # the probe sees every valid token
    return pooled, x
