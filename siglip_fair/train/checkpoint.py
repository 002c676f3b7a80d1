"""Orbax checkpoints of the train state together with the data iterator's position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary
directory and renames it when complete, so `latest_step()` only ever sees finished checkpoints
and a run killed mid-save resumes from the previous one.

A checkpoint that was completed but later damaged (a file truncated by a full disk or an
interrupted copy) is not skipped silently: restoring raises `CheckpointError` naming the step
and saying to delete its folder, which resumes from the previous step. A checkpoint of another
model size fails the same way, naming the first parameter whose shape differs.
"""
from __future__ import annotations

import os
from typing import Callable

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp

from siglip_fair.train import memory

_GRAIN_ITERATORS = (grain.DatasetIterator, grain.DataLoaderIterator)


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored; the message names the step and what to do."""


def _leaf_names(tree) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every array leaf (train states and orbax metadata alike)."""
  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
  return {name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


def _damaged(directory, step: int, steps, error: BaseException) -> CheckpointError:
  """The error for a checkpoint whose files do not read back (orbax, tensorstore and json
  raise many kinds), with the way to resume from the one before it."""
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  reason = reason.split(" See full TensorStore details")[0]  # the rest is a spec dump
  reason = reason if len(reason) <= 160 else reason[:157] + "..."
  folder = os.path.join(os.fspath(directory), str(step))
  earlier = [s for s in steps if s < step]
  resume = (f"delete {folder} to resume from step {max(earlier)}, the previous checkpoint"
            if earlier else f"delete {folder} to start over, or use a fresh --workdir")
  return CheckpointError(
      f"checkpoint step {step} in {os.fspath(directory)} cannot be read: a file in it is "
      f"damaged or truncated ({type(error).__name__}: {reason}); {resume}.")


def _check_shapes(directory, step: int, abstract_state) -> None:
  """Stored arrays against the ones the config builds, by name and shape, before orbax
  restores (its own error names neither the array nor the fix). Parameters first: they say
  which model the checkpoint holds."""
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(os.path.join(os.fspath(directory), str(step), "state"))
  tree = getattr(meta, "item_metadata", meta)
  stored = _leaf_names(tree) if tree is not None else {}
  if not stored:  # orbax returns no tree when its metadata files do not parse
    raise OSError("its array metadata does not read back")
  wanted = _leaf_names(abstract_state)
  where = f"checkpoint step {step} in {os.fspath(directory)}"
  fix = "use a fresh --workdir, or the config it was trained with"
  is_param = lambda n: n.startswith("params/")  # noqa: E731
  # Kernels first: their shapes say most about which size the checkpoint was trained with.
  order = lambda names: sorted(names, key=lambda n: (not n.endswith("kernel"), n))  # noqa: E731
  differ = order(n for n in wanted if is_param(n) and n in stored and stored[n] != wanted[n])
  if differ:
    n = differ[0]
    more = f" ({len(differ)} parameter arrays differ)" if len(differ) > 1 else ""
    raise CheckpointError(f"{where} has {n} of shape {stored[n]} but the config builds "
                          f"{wanted[n]}{more}: {fix}.")
  missing = order(n for n in wanted if is_param(n) and n not in stored)
  extra = order(n for n in stored if is_param(n) and n not in wanted)
  if missing or extra:
    got = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the config does not "
           "build")
    raise CheckpointError(f"{where} {got} ({len(missing)} parameters missing, {len(extra)} "
                          f"unexpected): it holds a different model; {fix}.")
  others = [n for n in wanted if not is_param(n)]
  missing = [n for n in others if n not in stored]
  extra = [n for n in stored if not is_param(n) and n not in wanted]
  differ = [n for n in others if n in stored and stored[n] != wanted[n]]
  if missing or extra or differ:
    first = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the config does "
             "not build" if extra else f"has {differ[0]} of shape {stored[differ[0]]}, not "
             f"{wanted[differ[0]]}")
    raise CheckpointError(f"{where} {first} ({len(missing)} train-state arrays missing, "
                          f"{len(extra)} unexpected, {len(differ)} of other shapes): it was "
                          "written with another optimizer (config.optim) or train state; "
                          f"{fix}.")


def make_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """Async CheckpointManager in `<workdir>/checkpoints` keeping the newest `keep` steps."""
  if keep is None or keep < 1:
    raise ValueError(f"config.keep_ckpts must be >= 1, got {keep!r}.")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def latest_step(workdir: str) -> int | None:
  """Step of the newest complete checkpoint in `<workdir>/checkpoints`, or None if there is none."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return None
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    return manager.latest_step()


def load_params(workdir: str, step: int | None = None, *, ema: bool = True):
  """The model parameters of a run's checkpoint (the latest when step is None), as host arrays.

  For using a trained model elsewhere (zero-shot annotation, evaluation in Colab); no train
  state or mesh is needed. A run trained with config.ema_decay > 0 gives its moving average (the
  weights its evaluations used) unless ema=False.
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {os.path.join(workdir, 'checkpoints')!r}"
                            "; train a model there first.")
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  path = os.path.join(directory, str(step), "state")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint step {step} has no state at {path!r}.")
  # Restored onto this process's first device: without a target orbax recreates each array
  # with the sharding it was saved with, over devices that, in a multi-process job or on
  # another machine, this process does not own ("no addressable shards").
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
  try:
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.metadata(path).item_metadata.tree
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                            if is_array(m) else m, tree, is_leaf=is_array)
      state = ckpt.restore(path, target)
  except Exception as e:  # pylint: disable=broad-except  # damaged files raise many kinds
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    raise _damaged(directory, step, steps, e) from None
  if "params" not in state:
    raise ValueError(f"checkpoint {path!r} holds {sorted(state)}, not a train state.")
  key = "ema_params" if ema and state.get("ema_params") is not None else "params"
  return jax.tree.map(np.asarray, state[key])


def _data_save_args(data_iter):
  if isinstance(data_iter, _GRAIN_ITERATORS):
    return grain.checkpoint.CheckpointSave(data_iter)
  state = data_iter.get_state()
  if not isinstance(state, dict):
    raise ValueError(
        f"{type(data_iter).__name__}.get_state() returned {type(state).__name__}; non-grain "
        "iterators must return a JSON-serialisable dict.")
  return ocp.args.JsonSave(state)


def _data_restore_args(data_iter):
  if isinstance(data_iter, _GRAIN_ITERATORS):
    return grain.checkpoint.CheckpointRestore(data_iter)
  return ocp.args.JsonRestore()


def save(manager: ocp.CheckpointManager, state, data_iter=None, *, force: bool = False) -> bool:
  """Starts an async save of `state` (at step `state.step`) and of `data_iter`'s position.

  The device->host copy happens before this returns, so `state` may be donated right after.
  Returns whether a checkpoint was started.
  """
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = _data_save_args(data_iter)
  return manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(**items),
                      force=force)


def restore_or_init(manager: ocp.CheckpointManager, init_fn: Callable, abstract_state,
                    data_iter=None):
  """Restores the latest complete checkpoint, or calls `init_fn()` when there is none.

  Args:
    manager: from `make_manager`.
    init_fn: () -> TrainState, used for a fresh start.
    abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set; restored arrays are
      placed with exactly these shardings.
    data_iter: iterator with get_state()/set_state(), moved to the checkpointed position.

  Returns:
    The train state; its `step` says where training resumes.
  """
  step = manager.latest_step()
  if step is None:
    return init_fn()
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  try:
    _check_shapes(manager.directory, step, abstract_state)
    has_data = "data" in manager.item_metadata(step)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # unreadable metadata
    raise _damaged(manager.directory, step, manager.all_steps(), e) from None
  if data_iter is not None:
    if not has_data:
      raise ValueError(
          f"checkpoint {step} in {manager.directory} has no data-iterator state; it cannot "
          "resume the input pipeline (start from a fresh workdir).")
    items["data"] = _data_restore_args(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  # tensorstore, json, orbax errors
    if memory.is_oom(e):  # the devices are too small for the state, not the files damaged
      raise
    raise _damaged(manager.directory, step, manager.all_steps(), e) from None
  if data_iter is not None and not isinstance(data_iter, _GRAIN_ITERATORS):
    data_iter.set_state(restored["data"])
  return restored["state"]
