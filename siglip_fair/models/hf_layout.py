"""The tensor-level half of models/hf.py: Hugging Face tensors <-> our parameters.

Each row (`row`) pairs a Hugging Face tensor with one of our flat parameter keys and the exact
array transforms between them (torch Linear stores [out, in], flax Dense [in, out]; attention
kernels are split per head in flax; torch convolutions are [out, in, h, w]), so a round trip is
bit-exact. `encoder`, `norm`, `linear`, `attention`, `mlp` build the rows of a block stack;
hf.py assembles the whole model's from config.json. `nest`, `stack`, `unstack` move between
flat keys, nested params and the stacked (`model.<tower>.scan=True`) layout.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from siglip_fair.models import trees

STACKS = {"img": "Transformer", "txt": "Encoder_0"}  # each tower's block stack


# (to ours, to Hugging Face) array transforms; `heads` splits attention projections per head.
def identity():
  return (lambda x: x), (lambda x: x)


def dense():  # torch Linear [out, in] <-> flax Dense [in, out]
  return (lambda x: x.T), (lambda x: x.T)


def conv():  # torch Conv2d [out, in, h, w] <-> flax Conv [h, w, in, out]
  return (lambda x: x.transpose(2, 3, 1, 0)), (lambda x: x.transpose(3, 2, 0, 1))


def heads_in(heads):  # [H*Dh, D] <-> [D, H, Dh]
  return (lambda x: x.T.reshape(x.shape[1], heads, -1)), (lambda x: x.reshape(x.shape[0], -1).T)


def heads_bias(heads):  # [H*Dh] <-> [H, Dh]
  return (lambda x: x.reshape(heads, -1)), (lambda x: x.reshape(-1))


def heads_out(heads):  # [D, H*Dh] <-> [H, Dh, D]
  return (lambda x: x.T.reshape(heads, -1, x.shape[0])), (lambda x: x.reshape(-1, x.shape[-1]).T)


def table():  # nn.Embedding [N, D] <-> our [1, N, D]
  return (lambda x: x[None]), (lambda x: x[0])


def vector():  # CLIP's class_embedding [D] <-> our cls [1, 1, D]
  return (lambda x: x.reshape(1, 1, -1)), (lambda x: x.reshape(-1))


def scalar(shape):  # logit_scale / logit_bias: (1,) in SigLIP, () in CLIP <-> our ()
  return (lambda x: x.reshape(())), (lambda x: x.reshape(shape))


def row(hf, ours, fns, part=None):
  """(Hugging Face key, part of it or None, our flat key, to ours, to Hugging Face). `part`
  (0, 1, 2): a third of a packed q/k/v tensor (torch MultiheadAttention's in_proj)."""
  return hf, part, ours, fns[0], fns[1]


def norm(hf, ours):
  return [row(f"{hf}.weight", f"{ours}/scale", identity()),
          row(f"{hf}.bias", f"{ours}/bias", identity())]


def linear(hf, ours, bias=True):
  return ([row(f"{hf}.weight", f"{ours}/kernel", dense())]
          + ([row(f"{hf}.bias", f"{ours}/bias", identity())] if bias else []))


def attention(hf, ours, heads, packed=False):
  rows = []
  for i, (torch_name, flax_name) in enumerate((("q_proj", "query"), ("k_proj", "key"),
                                               ("v_proj", "value"))):
    weight, bias = ((f"{hf}.in_proj_weight", f"{hf}.in_proj_bias") if packed
                    else (f"{hf}.{torch_name}.weight", f"{hf}.{torch_name}.bias"))
    part = i if packed else None
    rows += [row(weight, f"{ours}/{flax_name}/kernel", heads_in(heads), part),
             row(bias, f"{ours}/{flax_name}/bias", heads_bias(heads), part)]
  return rows + [row(f"{hf}.out_proj.weight", f"{ours}/out/kernel", heads_out(heads)),
                 row(f"{hf}.out_proj.bias", f"{ours}/out/bias", identity())]


def mlp(hf, ours):
  return linear(f"{hf}.fc1", f"{ours}/Dense_0") + linear(f"{hf}.fc2", f"{ours}/Dense_1")


def encoder(hf, ours, tower):
  rows = []
  for i in range(int(tower["num_hidden_layers"])):
    h, o = f"{hf}.encoder.layers.{i}", f"{ours}/encoderblock_{i}"
    rows += (norm(f"{h}.layer_norm1", f"{o}/LayerNorm_0")
             + attention(f"{h}.self_attn", f"{o}/MultiHeadDotProductAttention_0",
                          int(tower["num_attention_heads"]))
             + norm(f"{h}.layer_norm2", f"{o}/LayerNorm_1") + mlp(f"{h}.mlp", f"{o}/MlpBlock_0"))
  return rows


def nest(flat: Mapping[str, np.ndarray]) -> dict:
  params: dict = {}
  for key, value in flat.items():
    *path, leaf = key.split("/")
    node = params
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return params


flatten = trees.flatten_to_host


def stack(params: dict, towers) -> dict:
  """Per-layer `encoderblock_<i>` subtrees of `towers` ('img', 'txt') -> one stacked
  `encoderblock` subtree with a leading [depth] axis (our model.<tower>.scan=True layout)."""
  params = dict(params)
  for tower in towers:
    stack = dict(params[tower][STACKS[tower]])
    depth = sum(k.startswith("encoderblock_") for k in stack)
    layers = [stack.pop(f"encoderblock_{i}") for i in range(depth)]
    stack["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    params[tower] = dict(params[tower], **{STACKS[tower]: stack})
  return params


def unstack(params: Mapping) -> dict:
  """The inverse of stack for every tower stored stacked."""
  params = dict(params)
  for tower, name in STACKS.items():
    stack = dict(params.get(tower, {}).get(name, {}))
    if "encoderblock" not in stack:
      continue
    stacked = stack.pop("encoderblock")
    depth = len(jax.tree.leaves(stacked)[0])
    for i in range(depth):
      stack[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
    params[tower] = dict(params[tower], **{name: stack})
  return params
