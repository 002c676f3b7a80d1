"""Orbax checkpoints of the train state together with the data iterator's position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary
directory and renames it when complete, so `latest_step()` only ever sees finished checkpoints
and a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import os
from typing import Callable

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp

_GRAIN_ITERATORS = (grain.DatasetIterator, grain.DataLoaderIterator)


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


def load_params(workdir: str, step: int | None = None):
  """The model parameters of a run's checkpoint (the latest when step is None), as host arrays.

  For using a trained model elsewhere (zero-shot annotation, evaluation in Colab); no train
  state or mesh is needed.
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {os.path.join(workdir, 'checkpoints')!r}"
                            "; train a model there first.")
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint step {step} has no state at {path!r}.")
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(path)
  if "params" not in state:
    raise ValueError(f"checkpoint {path!r} holds {sorted(state)}, not a train state.")
  return jax.tree.map(np.asarray, state["params"])


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
  if data_iter is not None:
    if "data" not in manager.item_metadata(step):
      raise ValueError(
          f"checkpoint {step} in {manager.directory} has no data-iterator state; it cannot "
          "resume the input pipeline (start from a fresh workdir).")
    items["data"] = _data_restore_args(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if data_iter is not None and not isinstance(data_iter, _GRAIN_ITERATORS):
    data_iter.set_state(restored["data"])
  return restored["state"]
