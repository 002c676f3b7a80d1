"""Data-version schedules: parsing, the switching iterator against a brute-force sequence, and
a training run that switches at 10 % and 90 %, is killed in between and resumes identically."""
import json
import os

import grain
import jax
import numpy as np
import pytest

from siglip_fair.data import versions
from siglip_fair.train.loop import train
from siglip_fair.train.progress import read_metrics
from test_train import _config, _example


def test_parse_and_resolve_schedules():
  assert versions.parse_schedule("balanced") == [("balanced", None)]
  assert versions.schedule_steps("baseline->balanced@10%->balanced_proxies@90%", batch_size=8,
                                 total_steps=200) == [
      ("baseline", 0), ("balanced", 20), ("balanced_proxies", 180)]
  assert versions.schedule_steps("baseline -> balanced@0%", batch_size=8, total_steps=50) == [
      ("baseline", 0), ("balanced", 0)]
  assert versions.schedule_steps("baseline->balanced@1ep", batch_size=10, total_steps=50,
                                 num_examples=95) == [("baseline", 0), ("balanced", 10)]
  for bad, match in [("balancd", "unknown version 'balancd'"),
                     ("baseline->balanced", "needs one"),
                     ("baseline@5->balanced@10", "takes no '@WHEN'"),
                     ("baseline->balanced@90%->baseline@10%", "increasing"),
                     ("baseline->balanced@300", "increasing and within"),
                     ("baseline->balanced@soon", "cannot read duration")]:
    with pytest.raises(ValueError, match=match):
      versions.schedule_steps(bad, batch_size=8, total_steps=200)


def _stream(offset, batch=4):
  """An endless shuffled stream whose items say which version they came from."""
  ds = grain.MapDataset.range(offset, offset + 10).seed(offset).shuffle().repeat()
  return iter(ds.map(lambda i: {"x": np.int64(i)}).to_iter_dataset().batch(batch))


def test_scheduled_iterator_equals_brute_force_and_resumes():
  schedule = [("baseline", 0), ("balanced", 2), ("baseline", 9)]
  # Brute force: each version's own stream, consumed in turn.
  streams = {"baseline": _stream(0), "balanced": _stream(100)}
  expected = [next(streams["baseline" if i < 2 or i >= 9 else "balanced"])["x"]
              for i in range(12)]
  it = versions.ScheduledIterator({"baseline": _stream(0), "balanced": _stream(100)}, schedule)
  got, states = [], []
  for _ in range(12):
    states.append(json.loads(json.dumps(it.get_state())))  # checkpoints go through JSON
    batch = next(it)
    got.append(batch["x"])
    assert str(batch["data_version"]) == ("balanced" if 2 <= len(got) - 1 < 9 else "baseline")
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))
  for k in (1, 5, 10):  # before, between and after the switches
    fresh = versions.ScheduledIterator({"baseline": _stream(0), "balanced": _stream(100)},
                                       schedule)
    fresh.set_state(states[k])
    np.testing.assert_array_equal(np.stack([next(fresh)["x"] for _ in range(12 - k)]),
                                  np.stack(got[k:]))
  with pytest.raises(ValueError, match="same data_version"):
    versions.ScheduledIterator({"baseline": _stream(0)}, [("baseline", 0)]).set_state(states[3])
  with pytest.raises(ValueError, match="no iterator for versions"):
    versions.ScheduledIterator({"baseline": _stream(0)}, schedule)


def _toy_iterators():
  """Two toy data versions: the plain stream and a re-seeded ('balanced') one."""
  def make(seed):
    ds = grain.MapDataset.range(10**6).seed(seed).shuffle().map(_example)
    return iter(ds.to_iter_dataset().batch(32))
  return {"baseline": make(0), "balanced": make(1)}


def test_switch_at_10_and_90_percent_is_recorded_and_survives_a_kill(tmp_path):
  cfg = _config(total=20, log_every=1, ckpt_every=5, eval_every=100)
  spec = "baseline->balanced@10%->baseline@90%"
  schedule = versions.schedule_steps(spec, batch_size=32, total_steps=20)
  assert schedule == [("baseline", 0), ("balanced", 2), ("baseline", 18)]

  whole = train(cfg, str(tmp_path / "whole"),
                train_iter=versions.ScheduledIterator(_toy_iterators(), schedule))
  parts = str(tmp_path / "parts")
  kill = int(np.random.default_rng().integers(3, 18))  # a random step between the switches
  train(cfg, parts, train_iter=versions.ScheduledIterator(_toy_iterators(), schedule),
        stop_after=kill)
  resumed = train(cfg, parts, train_iter=versions.ScheduledIterator(_toy_iterators(), schedule))

  records = read_metrics(os.path.join(parts, "metrics.jsonl"))
  # Optimiser step s trains on batch s - 1: steps 1-2 baseline, 3-18 balanced, 19-20 baseline.
  assert [r["data_version"] for r in records] == (
      ["baseline"] * 2 + ["balanced"] * 16 + ["baseline"] * 2), kill
  assert [r["loss"] for r in records] == [
      r["loss"] for r in read_metrics(os.path.join(tmp_path / "whole", "metrics.jsonl"))]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(whole.params))
