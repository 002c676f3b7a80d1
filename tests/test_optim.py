"""Learning-rate schedules of config.optim (issue 17, item 4): cosine, rsqrt, constant,
cooldown and re-warm-up at data switches, against big_vision's formula written out in numpy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from siglip_fair.config.loading import get_config
from siglip_fair.data import versions
from siglip_fair.train.optim import make_optimizer, make_schedule

KINDS = ("cosine", "rsqrt", "constant")
# Every schedule is evaluated on this one grid of steps (then cut to its length): eager jax
# compiles each operation once per shape, so one shape keeps the many random cases fast.
GRID = jnp.arange(4097)


def _lr(schedule, total: int) -> np.ndarray:
  """[total + 1] float64: the schedule at steps 0 ... total."""
  assert total < GRID.shape[0]
  return np.asarray(schedule(GRID), np.float64)[:total + 1]


def _old_cosine(peak, total, warmup, end):
  """The schedule before issue 17, verbatim: optax's linear warm-up joined to its cosine."""
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=end)
  return optax.join_schedules([warm, decay], [warmup])


def _shape(kind, u, n, w, peak, end, timescale):
  """big_vision's multiplicative form for one segment: u steps in, n steps long, w warm-up."""
  warm = min(1.0, u / w) if w else 1.0
  if kind == "cosine":
    d = max(n - w, 1)
    progress = min(max(u - w, 0), d) / d
    decay = end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
  elif kind == "rsqrt":
    decay = 1 / math.sqrt(1 + (u - w) / timescale) if u >= w else 1.0
  else:
    decay = 1.0
  return peak * warm * decay


def _reference(t, *, kind, peak, total, warmup, end=0.0, cooldown=0, timescale=10_000,
               switches=(), rewarmup=0):
  """lr at update t, brute force in float64: find t's segment, then apply the cooldown."""
  start, w = 0, warmup
  for s in sorted(switches):
    if rewarmup and 0 < s < total and t >= s:
      start, w = s, min(rewarmup, total - s)
  lr = _shape(kind, t - start, total - start, w, peak, end, timescale)
  if cooldown:
    lr *= min(1.0, max(0.0, (total - t) / cooldown))
  return lr


def _random_setting(rng, kind, *, restarts):
  total = int(rng.integers(1, 400))
  warmup = int(rng.integers(0, total + 1))
  cooldown = int(rng.integers(0, total - warmup + 1)) if rng.random() < 0.7 else 0
  setting = dict(kind=kind, peak=float(10 ** rng.uniform(-5, 0)), total=total, warmup=warmup,
                 end=float(rng.uniform(0, 0.5)) if kind == "cosine" else 0.0,
                 cooldown=cooldown, timescale=int(rng.integers(1, 2 * total + 2)))
  if restarts:
    setting["switches"] = tuple(int(s) for s in rng.integers(-2, total + 3, rng.integers(1, 4)))
    setting["rewarmup"] = int(rng.integers(0, total + 2))
  return setting


def _build(setting):
  return make_schedule(setting["peak"], setting["total"], setting["warmup"], setting["end"],
                       kind=setting["kind"], cooldown_steps=setting["cooldown"],
                       timescale=setting["timescale"], restarts=setting.get("switches", ()),
                       rewarmup_steps=setting.get("rewarmup", 0))


def _check_against_reference(setting):
  steps = np.arange(setting["total"] + 1)
  got = _lr(_build(setting), setting["total"])
  want = np.array([_reference(int(t), **setting) for t in steps])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * setting["peak"],
                             err_msg=str(setting))


# ---------------------------------------------------------------- the default stays as it was


def test_default_cosine_is_bit_for_bit_the_old_schedule():
  rng = np.random.default_rng(0)
  for _ in range(60):
    total = int(rng.integers(1, 500))
    warmup = int(rng.integers(0, total + 1))
    peak, end = float(10 ** rng.uniform(-5, 0)), float(rng.choice([0.0, rng.uniform(0, 1)]))
    old = _old_cosine(peak, total, warmup, end)
    # Spelled out, and with every new option at its off value (a rewarmup without switches,
    # switches without a rewarmup).
    news = [make_schedule(peak, total, warmup, end, kind="cosine", cooldown_steps=0,
                          restarts=(), rewarmup_steps=int(rng.integers(0, total + 1))),
            make_schedule(peak, total, warmup, end, kind="cosine",
                          restarts=tuple(rng.integers(1, total + 1, 2)), rewarmup_steps=0)]
    for new in news:
      np.testing.assert_array_equal(_lr(new, total + 1), _lr(old, total + 1))
      for t in rng.integers(0, total + 1, 5):
        assert float(new(int(t))) == float(old(int(t)))


def test_shipped_config_gives_the_old_schedule():
  config = get_config("configs/siglip.py")
  assert (config.optim.schedule, config.optim.cooldown, config.optim.rewarmup) == (
      "cosine", "0", "0")
  for total, warmup in ((1200, 60), (7, 0), (30, 30)):
    _, schedule = make_optimizer(config.optim, total, warmup, switch_steps=(total // 2,),
                                 batch_size=config.batch_size)
    old = _old_cosine(config.optim.lr, total, warmup, config.optim.end_lr_frac)
    np.testing.assert_array_equal(_lr(schedule, total), _lr(old, total))


# ---------------------------------------------------------------- each shape vs numpy


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_matches_the_numpy_reference(kind):
  rng = np.random.default_rng(KINDS.index(kind))
  for _ in range(40):
    _check_against_reference(_random_setting(rng, kind, restarts=False))


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_with_rewarmups_matches_the_numpy_reference(kind):
  rng = np.random.default_rng(10 + KINDS.index(kind))
  for _ in range(40):
    _check_against_reference(_random_setting(rng, kind, restarts=True))


def test_rsqrt_is_big_vision_closed_form():
  """lr = P * min(1, t/W) / sqrt(1 + max(t - W, 0) / timescale) * min(1, (T - t) / C)."""
  rng = np.random.default_rng(3)
  for _ in range(30):
    total = int(rng.integers(20, 3000))
    warmup, cooldown = int(rng.integers(1, total // 3)), int(rng.integers(1, total // 3))
    timescale, peak = int(rng.integers(1, 5000)), float(rng.uniform(1e-4, 1))
    t = np.arange(total + 1, dtype=np.float64)
    want = (peak * np.minimum(1, t / warmup) / np.sqrt(1 + np.maximum(t - warmup, 0) / timescale)
            * np.minimum(1, (total - t) / cooldown))
    got = _lr(make_schedule(peak, total, warmup, kind="rsqrt", cooldown_steps=cooldown,
                            timescale=timescale), total)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    # Three timescales into the decay the lr has halved (before the cooldown).
    if warmup + 3 * timescale < total - cooldown:
      np.testing.assert_allclose(float(got[warmup + 3 * timescale]), peak / 2, rtol=1e-5)


# ---------------------------------------------------------------- re-warm-up properties


@pytest.mark.parametrize("kind", KINDS)
def test_rewarmup_restarts_from_zero_to_peak_then_decays_to_the_end(kind):
  rng = np.random.default_rng(20 + KINDS.index(kind))
  for _ in range(30):
    total = int(rng.integers(30, 2000))
    warmup = int(rng.integers(0, total // 4))
    switch = int(rng.integers(warmup + 1, total - 10))
    rewarmup = int(rng.integers(1, total - switch - 1))
    cooldown = int(rng.integers(1, total - switch - rewarmup)) if kind != "cosine" else 0
    peak, end = float(rng.uniform(1e-4, 1)), (float(rng.uniform(0, .5)) if kind == "cosine"
                                               else 0.0)
    common = dict(kind=kind, cooldown_steps=cooldown, timescale=int(rng.integers(1, 1000)))
    schedule = make_schedule(peak, total, warmup, end, restarts=(switch,),
                             rewarmup_steps=rewarmup, **common)
    plain = make_schedule(peak, total, warmup, end, **common)
    lr = _lr(schedule, total)
    # Before the switch: the schedule without restarts, exactly.
    np.testing.assert_array_equal(lr[:switch], _lr(plain, total)[:switch])
    # At the switch 0, then linear with slope peak / rewarmup, reaching the peak.
    ramp = np.arange(rewarmup + 1)
    np.testing.assert_allclose(lr[switch:switch + rewarmup + 1], peak * ramp / rewarmup,
                               rtol=1e-5, atol=1e-7 * peak)
    assert lr[switch] == 0.0
    assert lr[switch + rewarmup] == pytest.approx(peak, rel=1e-6)
    # Then never above the peak, never increasing, and at the end of training: end * peak
    # for the cosine, 0 after a cooldown.
    tail = lr[switch + rewarmup:]
    assert np.all(tail <= peak * (1 + 1e-6)) and np.all(np.diff(tail) <= 1e-6 * peak)
    np.testing.assert_allclose(lr[total], end * peak if kind == "cosine" else 0.0,
                               rtol=1e-5, atol=1e-7)


def test_rewarmup_at_every_switch_and_only_when_set():
  peak, total, warmup = 1.0, 100, 10
  plain = make_schedule(peak, total, warmup)
  for switches in ((30, 70), (70, 30, 30), (0, 30, 70, 100, 150)):  # unsorted, repeated, outside
    lr = _lr(make_schedule(peak, total, warmup, restarts=switches, rewarmup_steps=5), total)
    assert [t for t in range(1, total) if lr[t] == 0.0] == [30, 70]
    np.testing.assert_allclose(lr[[31, 35, 71, 75]], [0.2, 1.0, 0.2, 1.0], rtol=1e-6)
  # rewarmup 0 is off; a rewarmup with no switch (one data version) is a no-op.
  for kwargs in (dict(restarts=(30, 70), rewarmup_steps=0), dict(restarts=(), rewarmup_steps=5)):
    np.testing.assert_array_equal(_lr(make_schedule(peak, total, warmup, **kwargs), total),
                                  _lr(plain, total))
  # A re-warm-up longer than what is left ends at the peak on the last step.
  lr = _lr(make_schedule(peak, total, warmup, restarts=(90,), rewarmup_steps=50), total)
  np.testing.assert_allclose(lr[90:], np.arange(11) / 10, rtol=1e-6)


# ---------------------------------------------------------------- jit


@pytest.mark.parametrize("kind", KINDS)
def test_jitted_schedule_matches_python_evaluation(kind):
  rng = np.random.default_rng(30 + KINDS.index(kind))
  for _ in range(8):
    setting = _random_setting(rng, kind, restarts=True)
    schedule = _build(setting)
    jitted = jax.jit(schedule)  # a traced int32 step: any Python branch on it would raise
    in_step = jax.jit(lambda state: state["x"] * schedule(state["step"]))
    total = setting["total"]
    near_switches = {s + d for s in setting["switches"] for d in (-1, 0, 1)}
    steps = {0, total, *rng.integers(0, total + 1, 30)} | (near_switches & set(range(total + 1)))
    for i, t in enumerate(sorted(int(t) for t in steps)):
      python = float(schedule(t))
      # optax's warm-up computes peak - peak * (1 - t / w): near 0 it is off by ~eps * peak.
      tol = dict(rel=1e-6, abs=1e-6 * setting["peak"])
      assert float(jitted(jnp.int32(t))) == pytest.approx(python, **tol)
      if i % 4 == 0:
        got = in_step({"x": jnp.float32(2.0), "step": jnp.int32(t)})
        assert float(got) == pytest.approx(2 * python, rel=1e-6, abs=2e-6 * setting["peak"])


# ---------------------------------------------------------------- config fields


def _optim(**fields):
  return ml_collections.ConfigDict(dict(name="adamw", lr=0.5, **fields))


def test_config_durations_resolve_like_warmup():
  total, batch, examples = 400, 32, 3200  # 100 steps per epoch
  cases = [(dict(rewarmup="10%"), 40), (dict(rewarmup="1ep"), 100), (dict(rewarmup="640ex"), 20),
           (dict(rewarmup=25), 25), (dict(rewarmup="25"), 25), (dict(rewarmup=""), 0)]
  for fields, rewarmup in cases:
    _, got = make_optimizer(_optim(**fields), total, 8, (200,), batch_size=batch,
                            num_examples=examples)
    want = make_schedule(0.5, total, 8, restarts=(200,), rewarmup_steps=rewarmup)
    np.testing.assert_array_equal(_lr(got, total), _lr(want, total))
  fields = dict(schedule="rsqrt", cooldown="25%", timescale="0.5ep", rewarmup="5%")
  _, got = make_optimizer(_optim(**fields), total, 8, (100, 300), batch_size=batch,
                          num_examples=examples)
  want = [_reference(t, kind="rsqrt", peak=0.5, total=total, warmup=8, cooldown=100,
                     timescale=50, switches=(100, 300), rewarmup=20) for t in range(total + 1)]
  np.testing.assert_allclose(_lr(got, total), want, rtol=2e-5, atol=1e-7)


def test_rewarmup_override_is_accepted_from_the_command_line():
  config = get_config("configs/siglip.py:steps=200",
                      [("data_version", "baseline->balanced@90%"), ("optim.rewarmup", "5%"),
                       ("optim.schedule", "constant"), ("optim.cooldown", "5")])
  switches = versions.switch_steps(config.data_version, batch_size=config.batch_size,
                                   total_steps=200)
  assert switches == (180,)
  _, schedule = make_optimizer(config.optim, 200, 10, switches, batch_size=config.batch_size)
  lr = _lr(schedule, 200)
  assert lr[180] == 0 and lr[190] == pytest.approx(config.optim.lr) and lr[200] == 0
  assert lr[197] == pytest.approx(config.optim.lr * 3 / 5)


def test_switch_steps_are_the_later_starts_of_the_data_schedule():
  rng = np.random.default_rng(4)
  for _ in range(30):
    total = int(rng.integers(10, 5000))
    cuts = sorted(int(c) for c in rng.integers(0, total + 1, rng.integers(0, 4)))
    spec = "baseline" + "".join(f"->{rng.choice(versions.VERSIONS)}@{c}" for c in cuts)
    assert versions.switch_steps(spec, batch_size=8, total_steps=total) == tuple(cuts)
  assert versions.switch_steps("balanced->baseline@90%", batch_size=8, total_steps=50) == (45,)


@pytest.mark.parametrize("fields, match", [
    (dict(schedule="cosin"), r"optim\.schedule='cosin' is unknown.*rsqrt"),
    (dict(schedule="rsqrt", end_lr_frac=0.1), r"optim\.end_lr_frac.*schedule='cosine'"),
    (dict(cooldown=-5), r"optim\.cooldown.*>= 0"),
    (dict(cooldown="-5"), r"optim\.cooldown.*cannot read"),
    (dict(cooldown="95%"), r"optim\.cooldown.*fit after the 10 warm-up"),
    (dict(timescale=0), r"optim\.timescale.*positive"),
    (dict(rewarmup="soon"), r"optim\.rewarmup.*cannot read"),
    (dict(rewarmup=-1), r"optim\.rewarmup.*>= 0"),
])
def test_bad_fields_name_the_field_and_the_fix(fields, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(_optim(**fields), 100, 10, (50,), batch_size=4, num_examples=100)


def test_examples_or_epochs_need_the_batch_size():
  with pytest.raises(ValueError, match=r"optim\.rewarmup='2ep'.*batch_size="):
    make_optimizer(_optim(rewarmup="2ep"), 100, 10, (50,))
  # Steps and percentages do not: what config/checks.py validates without data.
  make_optimizer(_optim(rewarmup="10%", cooldown="7"), 100, 10, (50,))
