"""Input-wait time in the training loop (`input_wait_s`, `input_wait_frac`, the progress line)
and the worker-count rule `pipeline.workers_needed`.

The reference for the loop's figure is the test iterator's own clock: it times each of its
`__next__` calls (a sleep of a known, per-batch random length plus the real iterator), and the
loop, which times the same calls from outside, must report at least that and not much more.
"""
from fractions import Fraction
import math
import time

import numpy as np
import pytest

from siglip_fair.data.pipeline import workers_needed
from siglip_fair.train import loop
from siglip_fair.train.progress import INPUT_BOUND_FRAC, progress_line, read_metrics
from test_train import _config, _train_iter
from wrapped_iterator import WrappedIterator

# The model, length and schedule of test_loop_hygiene's runs: one compilation for all of them.
TOTAL = 4


def _small(**overrides):
  return _config(total=TOTAL, warmup=1, ckpt_every=2, batch_size=8, eval_every="never",
                 tensorboard=False, **overrides)


class _TimedSleepy(WrappedIterator):
  """Sleeps `sleeps[position]` seconds before each batch and records how long each call of
  `__next__` took by its own clock (calls in order, the loop's peek at the first batch included)."""

  def __init__(self, it, sleeps):
    super().__init__(it)
    self.sleeps, self.calls = sleeps, []

  def __next__(self):
    start = time.perf_counter()
    time.sleep(self.sleeps[self._position])
    batch = super().__next__()
    self.calls.append(time.perf_counter() - start)
    return batch


def test_logged_input_wait_matches_a_sleeping_iterator(tmp_path, capsys):
  rng = np.random.default_rng(0)
  # Per-batch sleeps of 0.1-0.4 s, far above the tiny model's step, so input bounds the run.
  sleeps = 0.1 + 0.3 * rng.random(TOTAL + 1)
  it = _TimedSleepy(_train_iter(8), sleeps)
  # progress on: without a terminal the loop prints one progress line per log.
  loop.train(_small(log_every=2, progress=True), str(tmp_path), train_iter=it)
  # calls[0] is the peek before training (which rewinds the iterator); calls[s] is step s's.
  assert len(it.calls) == TOTAL + 1
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    window = range(r["step"] - 1, r["step"] + 1)  # the two steps since the last log
    inside = np.mean([it.calls[s] for s in window])  # the iterator's own timing
    slept = np.mean([sleeps[s - 1] for s in window])  # positions 0.. after the rewind
    # The loop's clock encloses the iterator's: at least the sleep and the iterator's own
    # time, plus a few clock reads (generous slack for a loaded machine).
    assert slept <= inside <= r["input_wait_s"] <= inside + 0.05, (r, inside, slept)
    # The share of wall time: the same window as steps/s, so wait/step x steps/s; what the
    # sleep alone implies is a lower bound and, with the step far shorter than the sleep,
    # the bulk of it.
    implied = slept * r["steps_per_sec"]
    assert r["input_wait_frac"] == pytest.approx(r["input_wait_s"] * r["steps_per_sec"],
                                                 rel=1e-6)
    assert implied <= r["input_wait_frac"] <= 1.0
    assert r["input_wait_frac"] <= implied * 2 + 0.05
    assert r["input_wait_frac"] >= INPUT_BOUND_FRAC
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
  assert len(lines) == 2 and all("input-bound" in l for l in lines), lines


def test_input_wait_is_small_with_the_in_memory_iterator(tmp_path):
  loop.train(_small(log_every=1), str(tmp_path), train_iter=_train_iter(8))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert 0 <= r["input_wait_frac"] <= 1
    assert r["input_wait_frac"] == pytest.approx(r["input_wait_s"] * r["steps_per_sec"],
                                                 rel=1e-6)
  # Batches are prefetched by grain's threads: waiting is a small part of the step once they
  # run (the first window includes their start: ~50 ms of a 240 ms first step when measured).
  later = records[1:]
  waits = sum(r["input_wait_s"] for r in later)
  walls = sum(1 / r["steps_per_sec"] for r in later)
  assert waits < 0.25 * walls, (waits, walls)


def test_progress_line_shows_the_input_wait():
  base = progress_line(5, 10, 2.0, {"loss": 1.0})
  assert base == "step 5/10 (50%) loss 1.0000 2.00 steps/s ETA 0m02s"
  line = progress_line(5, 10, 2.0, {"loss": 1.0, "input_wait_frac": 0.123})
  assert line == "step 5/10 (50%) loss 1.0000 2.00 steps/s (input wait 12%) ETA 0m02s"
  line = progress_line(5, 10, 2.0, {"loss": 1.0, "input_wait_frac": 0.8})
  assert "(input wait 80%, input-bound)" in line


def test_workers_needed_against_the_closed_form():
  rng = np.random.default_rng(1)
  for _ in range(500):
    batch = int(rng.integers(1, 65537))
    step = float(rng.uniform(1e-3, 5.0))
    rate = float(rng.uniform(10.0, 5000.0))
    headroom = float(rng.uniform(1.0, 2.0))
    # Exact rational arithmetic on the same floats: ceil(headroom * B / (T * r)), at least 1.
    exact = Fraction(headroom) * batch / (Fraction(step) * Fraction(rate))
    want = max(1, math.ceil(exact))
    if abs(exact - round(exact)) < Fraction(1, 10**6):
      continue  # float rounding may legitimately land either side of an integer
    assert workers_needed(batch, step, rate, headroom) == want, (batch, step, rate, headroom)
  # Exact ratios do not round up by float error; at least one worker always.
  assert workers_needed(1000, 0.5, 1000.0, 1.0) == 2
  assert workers_needed(1024, 0.1, 1024.0, 1.2) == 12
  assert workers_needed(1, 10.0, 1000.0) == 1
  # More work per step or a slower worker never needs fewer workers.
  assert workers_needed(2048, 0.3, 500.0) >= workers_needed(1024, 0.3, 500.0)
  assert workers_needed(1024, 0.3, 250.0) >= workers_needed(1024, 0.3, 500.0)


@pytest.mark.parametrize("args,field", [((0, 0.3, 100.0), "batch_size"),
                                        ((64, 0.0, 100.0), "step_time_s"),
                                        ((64, 0.3, float("nan")), "images_per_s_per_worker"),
                                        ((64, 0.3, -5.0), "images_per_s_per_worker")])
def test_workers_needed_names_a_bad_argument(args, field):
  with pytest.raises(ValueError, match=field):
    workers_needed(*args)
  with pytest.raises(ValueError, match="headroom"):
    workers_needed(64, 0.3, 100.0, headroom=0.5)
