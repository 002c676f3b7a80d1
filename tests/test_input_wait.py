"""Input-wait time in the training loop (`input_wait_s`, `input_wait_frac`, the progress line)
and the worker-count rule `pipeline.workers_needed`.

The loop's clock (`loop.time.perf_counter`) is replaced by a fake one that only the test moves:
each read advances it by a fixed tick and the test iterator advances it by a known, per-batch
random "wait", so the logged figures have exact expected values and no assertion depends on
how busy the machine is (how fast the real pipeline is belongs in benchmarks/input_bench.py).
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


TICK = 1e-3  # what each read of the fake clock costs


class _FakeTime:
  """A stand-in for the `time` module in train/loop.py: perf_counter reads a clock that moves
  by TICK per read and by `advance`; everything else is the real module's."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    self.now += TICK
    return self.now

  def advance(self, seconds):
    self.now += seconds

  def __getattr__(self, name):
    return getattr(time, name)


class _Waiting(WrappedIterator):
  """Advances the fake clock by `waits[position]` inside each `__next__`, as a slow input
  pipeline would keep the loop waiting."""

  def __init__(self, it, clock, waits):
    super().__init__(it)
    self.clock, self.waits = clock, waits

  def __next__(self):
    self.clock.advance(self.waits[self._position])
    return super().__next__()


def test_logged_input_wait_is_the_time_spent_in_next(tmp_path, capsys, monkeypatch):
  clock = _FakeTime()
  monkeypatch.setattr(loop, "time", clock)
  rng = np.random.default_rng(0)
  # Per-batch waits of 0.1-0.4 s against a tick of 1 ms per clock read: input bounds the run.
  waits = 0.1 + 0.3 * rng.random(TOTAL + 1)
  # progress on: without a terminal the loop prints one progress line per log.
  loop.train(_small(log_every=2, progress=True), str(tmp_path),
             train_iter=_Waiting(_train_iter(8), clock, waits))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    # Steps s - 1 and s since the last log; iterator positions 0.. after the loop's peek rewinds.
    waited = np.mean([waits[s - 1] for s in (r["step"] - 1, r["step"])])
    # Timed around next() alone: the wait plus the one tick of the read that closes it.
    assert r["input_wait_s"] == pytest.approx(waited + TICK, abs=1e-9)
    assert r["input_wait_frac"] == pytest.approx(r["input_wait_s"] * r["steps_per_sec"],
                                                 rel=1e-6)
    # The window's wall time is the waits plus a few ticks, so the share is just under 1.
    assert 0.9 < r["input_wait_frac"] < 1.0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
  assert len(lines) == 2 and all("input-bound" in l for l in lines), lines


def test_input_wait_without_waiting_is_one_clock_read(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "time", _FakeTime())
  loop.train(_small(log_every=1), str(tmp_path), train_iter=_train_iter(8))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert r["input_wait_s"] == pytest.approx(TICK, abs=1e-12)
    assert r["input_wait_frac"] == pytest.approx(r["input_wait_s"] * r["steps_per_sec"],
                                                 rel=1e-6)
    assert r["input_wait_frac"] < INPUT_BOUND_FRAC  # the other reads of the window count too


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
