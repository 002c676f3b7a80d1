"""Metric logging (JSON lines and TensorBoard) and a terminal progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import tqdm

from siglip_fair.io import atomic_write


def _plain(value):
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the line parseable
  return value


class MetricWriter:
  """Appends one JSON object per line to `path`.

  On construction, lines with step > `resume_step` are dropped (atomically): they were written
  by a run that died after its last checkpoint and will be logged again.
  """

  def __init__(self, path: str, resume_step: int = 0):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
      self._truncate(resume_step)
    self._file = open(path, "a", encoding="utf-8")

  def _truncate(self, resume_step: int):
    with open(self.path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a crash
      if record.get("step", 0) <= resume_step:
        keep.append(json.dumps(record) + "\n")
    atomic_write(self.path, "".join(keep))

  def write(self, step: int, metrics: dict):
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


class TensorBoardWriter:
  """Scalar summaries in a TensorBoard event file under `logdir` (no TensorFlow needed).

  A resumed run first writes a SessionLog START at `resume_step + 1`: TensorBoard then discards
  the points from that step on that a run killed after its last checkpoint had already logged.
  """

  def __init__(self, logdir: str, resume_step: int = 0):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    self._writer = EventFileWriter(logdir)
    if resume_step:
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(resume_step) + 1, session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))

  def write(self, step: int, metrics: dict):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for name, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        values.append(summary_pb2.Summary.Value(tag=name, simple_value=float(value)))
    if values:
      self._writer.add_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def close(self):
    self._writer.close()


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool = True):
  """tqdm bar over steps showing steps/s and ETA; off unless `enabled` and stderr is a terminal
  (logs of batch jobs stay free of carriage-return noise)."""
  return tqdm.tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                   unit="step", dynamic_ncols=True, smoothing=0.1)


# Share of wall time blocked on input above which the progress line says the run is input-bound.
INPUT_BOUND_FRAC = 0.5


def input_wait_text(metrics: dict) -> str:
  """'input wait 12%' (with ', input-bound' from INPUT_BOUND_FRAC on) from `input_wait_frac`;
  '' when the metrics do not have it."""
  frac = metrics.get("input_wait_frac")
  if frac is None:
    return ""
  bound = ", input-bound" if frac >= INPUT_BOUND_FRAC else ""
  return f"input wait {100 * frac:.0f}%{bound}"


def progress_line(step: int, total: int, steps_per_sec: float, metrics: dict) -> str:
  """One log line for runs without a terminal: step, %, loss, steps/s, the share of time spent
  waiting for input (`input_wait_frac`) and the ETA."""
  remaining = (total - step) / max(steps_per_sec, 1e-9)
  eta = f"{int(remaining // 60)}m{int(remaining % 60):02d}s"
  loss = metrics.get("loss")
  shown = f" loss {loss:.4f}" if loss is not None else ""
  wait = input_wait_text(metrics)
  wait = f" ({wait})" if wait else ""
  return (f"step {step}/{total} ({100 * step / total:.0f}%){shown} "
          f"{steps_per_sec:.2f} steps/s{wait} ETA {eta}")


def start_line(start: int, total: int) -> str:
  """The one line a training run prints once it knows where it starts."""
  if start >= total:
    return f"training: already finished (step {start} of {total})"
  if start == 0:
    return f"training: fresh run, 0 of {total} steps"
  return f"training: resumed from step {start} of {total}"


# The metrics a periodic evaluation's summary line shows when present, in this order.
HEADLINE_METRICS = ("zeroshot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1", "bias/rb",
                    "bias/ab_mean")
_FALLBACK_COUNT = 4


def _scalar(value) -> float | None:
  try:
    value = np.asarray(value)
  except Exception:  # pylint: disable=broad-except  # objects numpy cannot hold
    return None
  if value.ndim or not np.issubdtype(value.dtype, np.number):
    return None
  return float(value)


def eval_summary_line(step: int, metrics: dict) -> str:
  """One line for a periodic evaluation, e.g. 'eval @ step 300: zeroshot/top1 0.512,
  bias/rb -12.3': the headline metrics present (`HEADLINE_METRICS`), else the first few
  numeric ones (bootstrap bounds, `*_lo`/`*_hi`, left out), to 3 significant digits."""
  numeric = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
  shown = [k for k in HEADLINE_METRICS if k in numeric]
  if not shown:
    shown = [k for k in numeric if not k.endswith(("_lo", "_hi"))][:_FALLBACK_COUNT]
  body = ", ".join(f"{k} {numeric[k]:.3g}" for k in shown) or "no metrics"
  return f"eval @ step {step}: {body}"
