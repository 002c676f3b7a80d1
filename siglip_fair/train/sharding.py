"""Device mesh, batch placement and regex sharding rules for the train state.

Mesh axes (`config.mesh`, sizes multiply to the device count):
  data: pure data parallelism (parameters replicated across it);
  fsdp: data parallelism whose parameters and optimizer state are split across it as well
    (ZeRO-3 style: XLA all-gathers each weight where it is used and reduce-scatters gradients).
The batch is split over every batch axis present (`BATCH_AXES`), so {'data': 2, 'fsdp': 4}
feeds 8 different row blocks.

The state is placed by `config.sharding_rules`, an ordered list of (regex, rule) pairs matched
against each leaf's path (e.g. 'params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel',
'opt_state/1/0/mu/img/...'); the first full match wins. Rules: 'replicate', and 'fsdp' (the
largest dimension divisible by the fsdp axis is split over it; leaves with none, and every leaf
on a mesh without an fsdp axis, are replicated).
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from siglip_fair.train.state import tree_names

# 'fsdp' degrades to replication without an fsdp axis, so one default serves every mesh.
DEFAULT_RULES = ((".*", "fsdp"),)
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """Builds a mesh from {axis_name: size}; one size may be -1 (= all remaining devices).

  `devices` defaults to all devices (of all processes).

  Axes are `Auto` so XLA propagates shardings through the model from the annotated inputs
  and outputs of the jitted step (GSPMD); e.g. {'data': -1} is pure data parallelism.
  """
  mesh_cfg = dict(mesh_cfg or {"data": -1})
  names, sizes = tuple(mesh_cfg), [int(s) for s in mesh_cfg.values()]
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  fix = (f"give sizes whose product is the device count ({n}), or -1 for one axis to take "
         "the rest, e.g. --config.mesh.data=-1")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={mesh_cfg}: sizes must be positive (or -1 for one axis); "
                     f"{fix}.")
  known = math.prod(s for s in sizes if s != -1)
  if n % known:
    raise ValueError(f"config.mesh={mesh_cfg}: {n} devices are not divisible by {known}; {fix}.")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(
        f"config.mesh={mesh_cfg} uses {math.prod(sizes)} devices but {n} are present; {fix}.")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: those of `BATCH_AXES` the mesh has, in mesh order."""
  axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} include no batch axis; add one of "
                     f"{BATCH_AXES} to config.mesh (e.g. {{'data': -1}}).")
  return axes


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the batch axes (every device gets equal rows);
  checked up front so a bad size fails before data are built or anything is written."""
  axes = batch_axes(mesh)
  size = math.prod(mesh.shape[a] for a in axes)
  if batch_size % size:
    lower, upper = batch_size // size * size, -(-batch_size // size) * size
    suggest = " or ".join(str(b) for b in (lower, upper) if b > 0)
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by the {size} devices of the "
        f"{'/'.join(axes)} mesh axes ({dict(mesh.shape)}); use a multiple of {size} "
        f"(e.g. {suggest}) or change config.mesh.")


def batch_sharding(mesh: Mesh, axis=None) -> NamedSharding:
  """Leading (batch) dimension split over `axis` (default: all batch axes), the rest replicated."""
  axis = batch_axes(mesh) if axis is None else axis
  if isinstance(axis, tuple) and len(axis) == 1:
    axis = axis[0]
  return NamedSharding(mesh, P(axis))


def global_batch(local_batch: dict, mesh: Mesh, axis=None) -> dict:
  """Process-local numpy arrays [b, ...] -> global jax.Arrays [b * processes, ...] split over
  `axis` (default: all batch axes)."""
  sharding = batch_sharding(mesh, axis)
  axis = sharding.spec[0]
  size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
  out = {}
  for key, x in local_batch.items():
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
    if x.ndim == 0 or global_rows % size:
      raise ValueError(
          f"batch[{key!r}] has shape {x.shape}: the global batch ({global_rows}) must be divisible "
          f"by the '{axis}' mesh axis ({size}); change config.batch_size or config.mesh.")
    out[key] = jax.make_array_from_process_local_data(sharding, x)
  return out


def _replicate(mesh: Mesh, shape) -> P:
  del mesh, shape
  return P()


def _fsdp(mesh: Mesh, shape) -> P:
  size = dict(mesh.shape).get("fsdp", 1)
  if size == 1:
    return P()
  # The largest dimension spreads the bytes most evenly; ties go to the last (the output
  # features of a kernel), whose gather XLA overlaps with the preceding matmul just as well.
  candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  return P(*([None] * dim), "fsdp")


RULES = {"replicate": _replicate, "fsdp": _fsdp}


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
  compiled = []
  for pattern, rule in rules:
    if rule not in RULES:
      raise ValueError(f"config.sharding_rules: unknown rule {rule!r}; known: {sorted(RULES)}.")
    compiled.append((re.compile(pattern), RULES[rule]))

  def leaf_sharding(name, leaf):
    if not leaf.shape:  # scalars (step, counts) are always replicated
      return NamedSharding(mesh, P())
    for regex, fn in compiled:
      if regex.fullmatch(name):
        return NamedSharding(mesh, fn(mesh, leaf.shape))
    raise ValueError(f"config.sharding_rules: no rule matches {name!r}; end with ('.*', ...).")

  return jax.tree.map(leaf_sharding, tree_names(abstract_state), abstract_state)
