"""The training loop: init or resume, sharded steps, metrics, evaluation, checkpoints.

Config fields read: seed, batch_size (global), total, warmup, log_every, ckpt_every, eval_every
(durations, see `siglip_fair.config.durations`), keep_ckpts, loss ('sigmoid' | 'softmax'),
loss_impl ('full' | 'ring' | 'chunked'), loss_chunk, model,
optim, mesh (default {'data': -1}), sharding_rules (default replicate all), progress (bool,
default True; the bar only shows when stderr is a terminal), tensorboard (bool, default True:
summaries in <workdir>/tensorboard), peak_flops (per-device FLOP/s for MFU when the device is
not in `flops.PEAK_FLOPS`).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

import jax
import numpy as np

from siglip_fair.config.durations import resolve_steps
from siglip_fair.models.two_tower import make_model
from siglip_fair.train import checkpoint
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train import flops as flops_lib
from siglip_fair.train.progress import (MetricWriter, TensorBoardWriter, progress_bar,
                                        progress_line)
from siglip_fair.train.sharding import (DEFAULT_RULES, batch_sharding, global_batch, make_mesh,
                                        state_shardings)
from siglip_fair.train.state import TrainState, make_init_fn, make_train_step

# Batch fields the step consumes, with the dtype they are fed as; other fields are not sent.
BATCH_DTYPES = {"image": np.float32, "text": np.int32, "weight": np.float32}


def _step_inputs(batch: dict) -> dict:
  missing = {"image", "text"} - set(batch)
  if missing:
    raise ValueError(f"train batches need fields {sorted(missing)}; got {sorted(batch)}.")
  return {k: np.asarray(batch[k], dtype) for k, dtype in BATCH_DTYPES.items() if k in batch}


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _due(step: int, every: int, total: int) -> bool:
  return step % every == 0 or step == total


def train(config, workdir: str, *, train_iter, evaluate_fn: Callable | None = None,
          num_examples: int | None = None, stop_after: int | None = None) -> TrainState:
  """Trains (or resumes training of) the two-tower model in `workdir`.

  Args:
    config: the experiment ConfigDict (fields in the module docstring).
    workdir: holds `checkpoints/` and `metrics.jsonl`; a workdir with checkpoints is resumed
      from its latest complete one, giving the same result as an uninterrupted run.
    train_iter: iterator of process-local numpy batches {'image' f32 [b, H, W, 3],
      'text' i32 [b, L], optional 'weight' f32 [b], ...} with get_state()/set_state().
    evaluate_fn: optional (params, step) -> dict of metrics, run every `eval_every` steps and
      at the end; results go to metrics.jsonl.
    num_examples: training-set size, needed when durations are given in epochs.
    stop_after: stop (with a checkpoint) after this step, as if the job were pre-empted.

  Returns:
    The final TrainState, at step min(stop_after, total_steps) (or where a finished workdir
    already is).
  """
  steps = resolve_steps(config, num_examples)
  total = steps.total_steps
  mesh = make_mesh(config.get("mesh"))
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, total, steps.warmup_steps)

  # Parameter shapes depend on the input shapes (e.g. number of patches): peek at one batch
  # and rewind, so the first training step still sees it.
  position = copy.deepcopy(train_iter.get_state())
  example = _step_inputs(next(train_iter))
  train_iter.set_state(position)
  local_b = example["image"].shape[0]
  if local_b * jax.process_count() != config.batch_size:
    raise ValueError(
        f"config.batch_size={config.batch_size} is the global batch but the iterator yields "
        f"{local_b} examples x {jax.process_count()} processes.")

  init = make_init_fn(model, tx, example["image"], example["text"])
  seed = jax.random.key_data(jax.random.key(config.get("seed", 0)))
  abstract_state = jax.eval_shape(init, seed)
  shardings = state_shardings(abstract_state, mesh, config.get("sharding_rules", DEFAULT_RULES))
  abstract_state = _with_shardings(abstract_state, shardings)
  manager = checkpoint.make_manager(workdir, config.get("keep_ckpts", 2))
  state = checkpoint.restore_or_init(
      manager, lambda: jax.jit(init, out_shardings=shardings)(seed), abstract_state, train_iter)
  start = int(jax.device_get(state.step))
  end = total if stop_after is None else min(stop_after, total)
  if start >= end:
    manager.close()
    return state

  bsharding = batch_sharding(mesh)
  abstract_batch = {
      k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype, sharding=bsharding)
      for k, v in example.items()}
  step_fn = make_train_step(model, tx, config.get("loss", "sigmoid"), schedule=schedule,
                            state_sharding=shardings, batch_sharding=bsharding,
                            loss_impl=config.get("loss_impl", "full"),
                            loss_chunk=config.get("loss_chunk", 1024))
  # Compiled ahead of time, once: a batch or state with any other shape, dtype or sharding
  # raises instead of silently recompiling.
  compiled_step = step_fn.lower(abstract_state, abstract_batch).compile()
  step_flops = flops_lib.step_flops(compiled_step)
  peak = flops_lib.peak_flops(jax.devices()[0], config.get("peak_flops"))

  is_lead = jax.process_index() == 0
  writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"), start) if is_lead else None
  tb = (TensorBoardWriter(os.path.join(workdir, "tensorboard"), start)
        if is_lead and config.get("tensorboard", True) else None)
  bar = progress_bar(total, start, enabled=bool(config.get("progress", True)) and is_lead)
  clock, clock_step = time.perf_counter(), start
  step_seconds = 0.0  # training time since this (re)start, evaluation and saving excluded
  try:
    for step in range(start + 1, end + 1):
      try:
        batch = next(train_iter)
      except StopIteration:
        raise ValueError(f"train_iter ran out of data at step {step} of {total}; make it "
                         "repeat, or shorten config.total.") from None
      # Placing the batch is the one host->device copy per step (multi-process placement goes
      # through a path the guard counts as implicit, so it stays outside). Inside, any implicit
      # transfer would stall every step, so it raises instead; the metric fetch is explicit.
      inputs = global_batch(_step_inputs(batch), mesh)
      with jax.transfer_guard("disallow"):
        state, metrics = compiled_step(state, inputs)
        logging_step = _due(step, steps.log_every, total)
        fetched = jax.device_get(metrics) if logging_step else None
      bar.update()
      record = {}
      if logging_step:
        record.update(fetched)
        if "data_version" in batch:  # from a data schedule (data/versions.py)
          record["data_version"] = str(batch["data_version"])
        now = time.perf_counter()
        step_seconds += now - clock
        record["steps_per_sec"] = (step - clock_step) / max(now - clock, 1e-9)
        record["examples_per_sec"] = record["steps_per_sec"] * config.batch_size
        # Device-hours spent training since this (re)start: the cost figure of scale sweeps.
        record["core_hours"] = step_seconds * jax.device_count() / 3600.0
        utilisation = flops_lib.mfu(step_flops, record["steps_per_sec"], peak)
        if utilisation is not None:
          record["mfu"] = utilisation
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if bar.disable and config.get("progress", True) and is_lead:
          print(progress_line(step, total, record["steps_per_sec"], record), flush=True)
      if evaluate_fn is not None and _due(step, steps.eval_every, total):
        record.update(evaluate_fn(state.params, step))
      if record and writer is not None:
        writer.write(step, {"examples_seen": step * config.batch_size, **record})
      if record and tb is not None:
        tb.write(step, record)
      if _due(step, steps.ckpt_every, total) or step == end:
        checkpoint.save(manager, state, train_iter)
      if record or step % steps.ckpt_every == 0:
        clock, clock_step = time.perf_counter(), step  # steps/s excludes eval and saving
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    for w in (writer, tb):
      if w is not None:
        w.close()
  return state
