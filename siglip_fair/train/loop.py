"""The training loop: init or resume, sharded steps, metrics, evaluation, checkpoints.

Config fields read: seed, batch_size (global), total, warmup, log_every, ckpt_every, eval_every
(durations, see `siglip_fair.config.durations`), keep_ckpts, loss ('sigmoid' | 'softmax'),
loss_impl ('full' | 'ring' | 'chunked'), loss_chunk, model,
optim, mesh (default {'data': -1}), sharding_rules (default replicate all), progress (bool,
default True; the bar only shows when stderr is a terminal), tensorboard (bool, default True:
summaries in <workdir>/tensorboard), peak_flops (per-device FLOP/s for MFU when the device is
not in `flops.PEAK_FLOPS`), nonfinite ('stop' | 'skip', default 'stop': what a step whose
loss, gradients or updated parameters are NaN/Inf does; see below), ema_decay (default 0 =
off; > 0 also keeps a moving average of the parameters, which `evaluate_fn`, `eval_params` of
the returned state and `checkpoint.load_params` use; see `state.make_train_step`), accum_steps
(default 1) and accum_mode ('cached' | 'micro', default 'cached'): gradient accumulation over
micro-batches of the global batch (`accumulate`).

Input wait. Each logged record has `input_wait_s`, the mean host time per step spent blocked in
`next(train_iter)` since the last log, and `input_wait_frac`, its share of that window's wall
time (the progress line shows it). Only the host's clock is read around the iterator, no device
sync: near 0 while the device bounds the run, near 1 when the input pipeline does (then raise the
pipeline's threads / workers: `pipeline.workers_needed`).

Non-finite steps. Every step computes a finite flag on the device; the loop reads the flags of
the steps since its last look (no per-step host sync) before it logs, evaluates or saves, so no
checkpoint ever follows a bad step. 'stop' raises `NonFiniteError` naming the first bad step,
the offending metrics and the last good checkpoint (which stays the latest); 'skip' drops that
step's update inside the compiled step (parameters and optimizer state unchanged, bit for bit),
logs `nonfinite` (0/1) and the running count `nonfinite_steps`, and trains on.

Start. Process 0 first prints the devices the run uses (`backend.startup_lines`: backend,
device kinds, processes; a warning when an accelerator plugin found no device and the run fell
back to the CPU, or when model.dtype is slow there; a ValueError when the devices cannot compute
in it). Once the state is restored or initialised, process 0 prints one line saying whether
this is a fresh run, a resume (from which step) or a finished run, and `train`'s `on_start`
runs on every process, before compilation.

Stopping. From the start of `train` (before restore and compilation), SIGTERM (what SLURM,
Kubernetes and Cloud TPU send before evicting a job) and SIGINT (Ctrl-C) set a flag; at the end
of the current step the loop saves a checkpoint, waits for it, and raises `Preempted` with exit
status 128 + the signal (143 for SIGTERM, what schedulers read as "terminated"; 130 for
SIGINT). A signal during compilation is noticed after it (see `signals`). Rerunning the same
command resumes bit for bit. With several processes the processes agree on the step of a
SIGTERM through JAX's preemption sync point (Ctrl-C there stays a KeyboardInterrupt).

Periodic work. eval_every 0 or 'never' turns periodic evaluation off (the caller evaluates the
final model itself); ckpt_every 0 saves only at the end (and on a stop signal). Each periodic
evaluation prints one summary line on process 0 (`progress.eval_summary_line`).

Out of memory. XLA's RESOURCE_EXHAUSTED while restoring, compiling or running the step becomes
`OutOfMemoryError` (a ValueError) naming what ran out and the config knobs that need less
memory (`memory.oom_message`).
"""
from __future__ import annotations

import copy
import math
import os
import time
from typing import Callable

import jax
import numpy as np

from siglip_fair.config.durations import resolve_steps
from siglip_fair.data import versions
from siglip_fair.models.two_tower import make_model
from siglip_fair.train import backend, checkpoint
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train import flops as flops_lib
from siglip_fair.train import memory, signals
from siglip_fair.train.memory import OutOfMemoryError  # noqa: F401  (re-exported)
from siglip_fair.train.progress import (MetricWriter, TensorBoardWriter, eval_summary_line,
                                        progress_bar, progress_line, start_line)
from siglip_fair.train.signals import (Preempted, sigterm_flag,  # noqa: F401  (re-exported)
                                       sigterm_raises)
from siglip_fair.train.sharding import (DEFAULT_RULES, batch_axes, batch_sharding,
                                        global_batch, make_mesh, state_shardings)
from siglip_fair.train.state import TrainState, eval_params, make_init_fn, make_train_step

# Batch fields the step consumes, with the dtype they are fed as; other fields are not sent.
BATCH_DTYPES = {"image": np.float32, "text": np.int32, "weight": np.float32}

# The step's metrics that say what went non-finite, in the order the error message names them.
_GUARDED = ("loss", "grad_norm", "param_norm")


class NonFiniteError(ValueError):
  """A training step produced NaN/Inf under nonfinite='stop'; nothing after it was saved."""


class _NonFiniteGuard:
  """The steps' finite flags, still on the device, until the loop next looks at them.

  `add` keeps references to a step's outputs (no transfer); `check` fetches everything
  pending in one device_get and, under 'stop', raises at the first non-finite step.
  """

  def __init__(self, policy: str, manager, workdir: str, count: int):
    self.policy, self.manager, self.workdir = policy, manager, workdir
    self.pending = []  # (step, {name: device scalar}), 'stop' only
    self.reported = count  # nonfinite_steps when skips were last reported

  def add(self, step: int, metrics: dict):
    if self.policy == "stop":
      self.pending.append((step, {k: metrics[k] for k in ("nonfinite", *_GUARDED)}))

  def check(self):
    pending, self.pending = self.pending, []
    if self.policy != "stop":
      return
    flags = jax.device_get([m["nonfinite"] for _, m in pending])
    for (step, metrics), bad in zip(pending, flags):
      if bad:
        raise NonFiniteError(self._message(step, jax.device_get(metrics)))

  def report_skips(self, step: int, count: int):
    """Under 'skip', one line on stdout when steps were skipped since the last report."""
    if count > self.reported:
      print(f"training: skipped {count - self.reported} non-finite step(s) up to step {step} "
            f"({count} in all; nonfinite='skip')", flush=True)
      self.reported = count

  def _message(self, step: int, metrics: dict) -> str:
    values = {k: float(metrics[k]) for k in _GUARDED}
    name = next((k for k in _GUARDED if not np.isfinite(values[k])), "loss")
    others = ", ".join(f"{k} {values[k]:.4g}" for k in _GUARDED if k != name)
    self.manager.wait_until_finished()
    last = self.manager.latest_step()
    where = (f"the last good checkpoint is step {last} in {self.manager.directory}" if last
             is not None else f"there is no checkpoint yet in {self.workdir}")
    return (f"training: {name} is {values[name]:.4g} at step {step} ({others}); {where}; lower "
            "optim.lr or set nonfinite='skip'")


def _step_inputs(batch: dict) -> dict:
  missing = {"image", "text"} - set(batch)
  if missing:
    raise ValueError(f"train batches need fields {sorted(missing)}; got {sorted(batch)}.")
  return {k: np.asarray(batch[k], dtype) for k, dtype in BATCH_DTYPES.items() if k in batch}


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _due(step: int, every: int, total: int) -> bool:
  """Whether `step` is a multiple of `every` or the last; every=0: only the last."""
  return step == total or (every > 0 and step % every == 0)


def train(config, workdir: str, *, train_iter, evaluate_fn: Callable | None = None,
          num_examples: int | None = None, stop_after: int | None = None,
          on_start: Callable[[int, int], None] | None = None) -> TrainState:
  """Trains (or resumes training of) the two-tower model in `workdir`.

  Args:
    config: the experiment ConfigDict (fields in the module docstring).
    workdir: holds `checkpoints/` and `metrics.jsonl`; a workdir with checkpoints is resumed
      from its latest complete one, giving the same result as an uninterrupted run.
    train_iter: iterator of process-local numpy batches {'image' f32 [b, H, W, 3],
      'text' i32 [b, L], optional 'weight' f32 [b], ...} with get_state()/set_state().
    evaluate_fn: optional (params, step) -> dict of metrics, run every `eval_every` steps and
      at the end (never with eval_every 0 or 'never'); results go to metrics.jsonl.
    num_examples: training-set size, needed when durations are given in epochs.
    stop_after: stop (with a checkpoint) after this step, as if the job were pre-empted.
    on_start: optional (start_step, total_steps) -> None, called on every process once the
      state is restored or initialised, i.e. after every check of the workdir's checkpoints
      (a run already finished included) and before compilation: the place to write the
      run's config.json, which a rejected resume then never replaces.

  Returns:
    The final TrainState, at step min(stop_after, total_steps) (or where a finished workdir
    already is).

  Raises:
    Preempted: on SIGTERM (status 143) or SIGINT (status 130), after saving a checkpoint at
      the step that was running.
    NonFiniteError: under nonfinite='stop', at the first step with NaN/Inf.
    OutOfMemoryError: when a device runs out of memory restoring, compiling or stepping.
  """
  # First of all: a signal during restore or compilation (minutes for big models) then sets
  # the flag, read at the end of the first step, instead of interrupting XLA's C++ code.
  with signals.stop_flag() as stop:
    return _train(config, workdir, stop, train_iter, evaluate_fn, num_examples, stop_after,
                  on_start)


def _train(config, workdir, stop, train_iter, evaluate_fn, num_examples, stop_after, on_start):
  lines = backend.startup_lines(config)  # raises first when the dtype cannot run here
  if jax.process_index() == 0:
    print("\n".join(lines), flush=True)
  steps = resolve_steps(config, num_examples)
  total = steps.total_steps
  mesh = make_mesh(config.get("mesh"))
  model = make_model(config.model)
  # Data switches of a data_version schedule, where optim.rewarmup restarts the lr schedule.
  switches = versions.switch_steps(config.get("data_version", "baseline"),
                                   batch_size=config.batch_size, total_steps=total,
                                   num_examples=num_examples)
  tx, schedule = make_optimizer(config.optim, total, steps.warmup_steps, switches,
                                batch_size=config.batch_size, num_examples=num_examples)

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

  ema_decay = float(config.get("ema_decay", 0.0))
  init = make_init_fn(model, tx, example["image"], example["text"], ema=ema_decay > 0)
  seed = jax.random.key_data(jax.random.key(config.get("seed", 0)))
  abstract_state = jax.eval_shape(init, seed)
  shardings = state_shardings(abstract_state, mesh, config.get("sharding_rules", DEFAULT_RULES))
  abstract_state = _with_shardings(abstract_state, shardings)
  manager = checkpoint.make_manager(workdir, config.get("keep_ckpts", 2))
  with memory.oom_hint("restoring or initialising the train state", config):
    state = checkpoint.restore_or_init(
        manager, lambda: jax.jit(init, out_shardings=shardings)(seed), abstract_state,
        train_iter)
  start = int(jax.device_get(state.step))
  end = total if stop_after is None else min(stop_after, total)
  is_lead = jax.process_index() == 0
  if on_start is not None:  # may refuse the resume: before the line that announces it
    try:
      on_start(start, total)
    except BaseException:
      manager.close()
      raise
  if is_lead:
    print(start_line(start, total), flush=True)
  if start >= end:
    manager.close()
    if stop.is_set():  # nothing left to train, but the job was still asked to stop
      raise signals.preempted(start, stop, is_lead)
    return state

  bsharding = batch_sharding(mesh)
  accum_steps = int(config.get("accum_steps", 1))
  shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  if accum_steps < 1 or config.batch_size % (accum_steps * shards):
    raise ValueError(f"config.accum_steps={accum_steps} must be >= 1 and split each of the "
                     f"{shards} batch shards' {config.batch_size // shards} rows evenly "
                     f"(config.batch_size={config.batch_size}).")
  abstract_batch = {
      k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype, sharding=bsharding)
      for k, v in example.items()}
  policy = config.get("nonfinite", "stop")
  step_fn = make_train_step(model, tx, config.get("loss", "sigmoid"), schedule=schedule,
                            state_sharding=shardings, batch_sharding=bsharding,
                            loss_impl=config.get("loss_impl", "full"),
                            loss_chunk=config.get("loss_chunk", 1024), nonfinite=policy,
                            ema_decay=ema_decay, accum_steps=accum_steps,
                            accum_mode=config.get("accum_mode", "cached"))
  # Compiled ahead of time, once: a batch or state with any other shape, dtype or sharding
  # raises instead of silently recompiling.
  with memory.oom_hint("compiling the train step", config):
    compiled_step = step_fn.lower(abstract_state, abstract_batch).compile()
  step_flops = flops_lib.step_flops(compiled_step)
  peak = flops_lib.peak_flops(jax.devices()[0], config.get("peak_flops"))

  writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"), start) if is_lead else None
  tb = (TensorBoardWriter(os.path.join(workdir, "tensorboard"), start)
        if is_lead and config.get("tensorboard", True) else None)
  bar = progress_bar(total, start, enabled=bool(config.get("progress", True)) and is_lead)
  clock, clock_step = time.perf_counter(), start
  step_seconds = 0.0  # training time since this (re)start, evaluation and saving excluded
  input_wait = 0.0  # host seconds blocked in next(train_iter) since `clock`
  guard = _NonFiniteGuard(policy, manager, workdir, int(jax.device_get(state.nonfinite_steps)))
  step = start
  try:
    for step in range(start + 1, end + 1):
      # Host time blocked on the input pipeline, before the step is dispatched. Dispatch is
      # asynchronous, so while the device is the bottleneck the prefetched batch is ready and
      # this is ~0; a large share of wall time here means input bounds the run.
      waited = time.perf_counter()
      try:
        batch = next(train_iter)
      except StopIteration:
        raise ValueError(f"train_iter ran out of data at step {step} of {total}; make it "
                         "repeat, or shorten config.total.") from None
      input_wait += time.perf_counter() - waited
      with memory.oom_hint(f"running train step {step}", config):
        # Placing the batch is the one host->device copy per step (multi-process placement
        # goes through a path the guard counts as implicit, so it stays outside). Inside, any
        # implicit transfer would stall every step, so it raises instead; the metric fetch is
        # explicit.
        inputs = global_batch(_step_inputs(batch), mesh)
        with jax.transfer_guard("disallow"):
          state, metrics = compiled_step(state, inputs)
          guard.add(step, metrics)
          logging_step = _due(step, steps.log_every, total)
          fetched = jax.device_get(metrics) if logging_step else None
      bar.update()
      # Checked at the end of every step (a flag, or a local check in multi-process runs): on
      # SIGTERM or SIGINT the state of this step is saved and the job stops.
      preempted = stop.is_set() or signals.preemption_sync_point(step)
      evaluating = (evaluate_fn is not None and steps.eval_every > 0
                    and _due(step, steps.eval_every, total))
      saving = _due(step, steps.ckpt_every, total) or step == end or preempted
      if logging_step or evaluating or saving:
        guard.check()  # raises at a non-finite step under 'stop', before anything is kept
      record = {}
      if logging_step:
        record.update(fetched)
        guard.report_skips(step, int(fetched["nonfinite_steps"]))
        if "data_version" in batch:  # from a data schedule (data/versions.py)
          record["data_version"] = str(batch["data_version"])
        now = time.perf_counter()
        step_seconds += now - clock
        record["steps_per_sec"] = (step - clock_step) / max(now - clock, 1e-9)
        record["examples_per_sec"] = record["steps_per_sec"] * config.batch_size
        # Mean input wait per step over the window, and its share of the window's wall time.
        record["input_wait_s"] = input_wait / max(step - clock_step, 1)
        record["input_wait_frac"] = min(input_wait / max(now - clock, 1e-9), 1.0)
        # Device-hours spent training since this (re)start: the cost figure of scale sweeps.
        record["core_hours"] = step_seconds * jax.device_count() / 3600.0
        utilisation = flops_lib.mfu(step_flops, record["steps_per_sec"], peak)
        if utilisation is not None:
          record["mfu"] = utilisation
        bar.set_postfix(loss=f"{record['loss']:.4f}", input=f"{record['input_wait_frac']:.0%}")
        if bar.disable and config.get("progress", True) and is_lead:
          print(progress_line(step, total, record["steps_per_sec"], record), flush=True)
      if evaluating:
        results = evaluate_fn(eval_params(state), step)
        record.update(results)
        if is_lead:
          print(eval_summary_line(step, results), flush=True)
      if record and writer is not None:
        writer.write(step, {"examples_seen": step * config.batch_size, **record})
      if record and tb is not None:
        tb.write(step, record)
      if saving:
        # force: a pre-emption step need not be a multiple of ckpt_every.
        checkpoint.save(manager, state, train_iter, force=preempted)
      if preempted:
        manager.wait_until_finished()
        raise signals.preempted(step, stop, is_lead)
      if record or saving:
        clock, clock_step = time.perf_counter(), step  # steps/s excludes eval and saving
        input_wait = 0.0
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    for w in (writer, tb):
      if w is not None:
        w.close()
  if stop.is_set():
    # A signal after the last step's check: training is complete and saved, but the job was
    # still asked to stop (what follows, e.g. the final evaluation, is not run).
    raise signals.preempted(step, stop, is_lead)
  return state
