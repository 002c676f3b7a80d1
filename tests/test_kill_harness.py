"""Kill harness: training, M4 balancing and a sweep, each killed again and again by SIGTERM and
by SIGKILL at random points and restarted with the same command, end bit-identical (CPU) to an
uninterrupted run; after every kill, every output that exists is whole.

One victim workdir per (workload, signal) is killed >= 10 times, then run to the end; how the
victims run and where the kills land: kill_harness.py.
"""
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from kill_harness import (INTERRUPTED, KILLS, PREEMPTED, RUNS, SEED, SIGNALS, Point, _kill_at,
                          _kill_repeatedly, _lanes, _run, _sigterm_step, check_outputs)
from kill_harness import cpu, servers  # noqa: F401  (pytest fixtures)
from siglip_fair.train import checkpoint

TRAIN_STEPS = 12
SWEEP_STEPS = 6
WORLD = dict(train=200, objects=20, people=20, retrieval=20)
MODEL = "res=16,variant=mu/8,width=32,depth=1,embed=32,batch=8"

MICRO_SWEEP = f'''
from configs import demo

WORLD = {WORLD!r}


def get_config(arg=None):
  c = demo.get_config(",".join(filter(None, ["{MODEL},steps={SWEEP_STEPS}", arg])))
  c.world.sizes.update(WORLD)
  c.warmup, c.log_every, c.ckpt_every, c.eval_every = "1", "1", "2", "100%"
  c.progress, c.eval_batch_size = False, 20
  for name in ("zeroshot", "retrieval", "gender_acc", "ab"):  # one evaluator is enough here
    del c.evals[name]
  c.evals.rb.bootstrap.num_samples = 10
  return c


def sweep(add):
  for seed in (0, 1):
    add(seed=seed)
'''


def setup_module():
  print(f"kill harness seed {SEED} (KILL_HARNESS_SEED={SEED} reruns with the same draws)")


def _train_point(sig):
  def choose(rng, workdir, kills):
    """A step past the latest checkpoint (SIGKILL: up to five, plus up to 50 ms, often inside
    the save that follows an even step), or now and then start-up (restore, compilation).
    A SIGTERM at start-up is noticed after the restore and saves the next step, so the victim
    can finish before its kills are done: a finished one loses its final checkpoint (as if
    it were lost), so the next run resumes from the one before and trains again."""
    del kills
    done = checkpoint.latest_step(workdir) or 0
    if done >= TRAIN_STEPS:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(done)))
      done = checkpoint.latest_step(workdir) or 0
    if rng.random() < 0.4 or done + 1 > TRAIN_STEPS - 3:
      return Point("start", delay=rng.uniform(0.1, 1.5))
    ahead = rng.randint(1, 5) if sig == signal.SIGKILL else rng.randint(1, 2)
    target = min(done + ahead, TRAIN_STEPS - 3)
    return Point("step", target, rng.uniform(0, 0.05) if sig == signal.SIGKILL else 0.0)
  return choose


def _seen(workdir):
  """Batch content by stream position; a resumed run re-reads positions after its checkpoint,
  and the last reading of each position is the one training used."""
  order = {}
  with open(os.path.join(workdir, "seen.jsonl")) as f:
    for line in f:
      if line.endswith("\n"):
        pos, labels, total = json.loads(line)
        order[pos] = (labels, total)
  return order


def _losses(workdir, run=""):
  with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_training_killed_repeatedly_resumes_bit_identical(servers, cpu, tmp_path):
  def check(workdir, sig, kill):
    check_outputs(workdir, sig, kill)
    step = _sigterm_step(kill.log)
    if step is not None:  # the pre-emption checkpoint is the step the message names
      assert checkpoint.latest_step(workdir) == step, (kill.log, SEED)

  def victim(name):
    workdir = str(tmp_path / name)
    return lambda: _kill_repeatedly(servers[name == "SIGKILL"], "train",
                                    [workdir, str(TRAIN_STEPS)], workdir,
                                    _train_point(SIGNALS[name]), SIGNALS[name],
                                    f"train {name}", check)

  # Two uninterrupted runs in fresh workdirs (determinism), and the two victims.
  whole, again = str(tmp_path / "whole"), str(tmp_path / "again")
  _lanes([lambda: _run(servers[0], "train", [whole, str(TRAIN_STEPS)], whole),
          lambda: _run(servers[0], "train", [again, str(TRAIN_STEPS)], again),
          victim("SIGTERM")],
         [victim("SIGKILL")])
  for name in ("again", *SIGNALS):
    _same_training(whole, str(tmp_path / name), name)


def _same_training(whole, other, name):
  """`other` ended with the uninterrupted run's batches, parameters and losses, bit for bit."""
  assert _seen(other) == _seen(whole), (name, SEED)  # the same batches at every position
  with np.load(os.path.join(whole, "params.npz")) as a, \
      np.load(os.path.join(other, "params.npz")) as b:
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key} seed {SEED}")
  # Every step logged once, with the uninterrupted run's loss bit for bit.
  assert _losses(other) == _losses(whole), (name, SEED)
  assert [s for s, _ in _losses(other)] == list(range(1, TRAIN_STEPS + 1))


def test_training_interrupted_while_compiling_saves_and_resumes(servers, cpu, tmp_path):
  """Ctrl-C (SIGINT) right after the start line, i.e. while the step compiles (a KeyboardInterrupt
  inside XLA's C++ twice ended in SIGSEGV): noticed at the end of that step, which is saved;
  exit 130, and the rerun resumes there and ends as an uninterrupted run."""
  whole, victim = str(tmp_path / "whole"), str(tmp_path / "SIGINT")
  args = [victim, str(TRAIN_STEPS)]

  def interrupt():
    os.makedirs(victim)
    kill = _kill_at(servers[1], "train", args, victim, Point("log", "training: fresh run"),
                    signal.SIGINT, os.path.join(victim, "victim.log"))
    check_outputs(victim, signal.SIGINT, kill)
    latest = checkpoint.latest_step(victim)
    _run(servers[1], "train", args, victim)
    with open(os.path.join(victim, "run.log")) as f:
      return kill, latest, f.read()

  (_,), ((kill, latest, rerun),) = _lanes(
      [lambda: _run(servers[0], "train", [whole, str(TRAIN_STEPS)], whole)], [interrupt])
  assert kill.code == INTERRUPTED, kill.log  # 128 + SIGINT, not a traceback or a crash
  assert "Traceback" not in kill.log and "KeyboardInterrupt" not in kill.log, kill.log
  step = _sigterm_step(kill.log, "SIGINT")
  assert step is not None and latest == step and step < TRAIN_STEPS, kill.log
  assert "rerun the same command to resume" in kill.log
  assert f"training: resumed from step {step} of {TRAIN_STEPS}" in rerun
  _same_training(whole, victim, "SIGINT")


# ---------------------------------------------------------------- balancing


@pytest.fixture(scope="module")
def world(servers, tmp_path_factory):
  """The synthetic world both the balancing and the sweep read, built once."""
  root = tmp_path_factory.mktemp("world")
  data_dir = str(root / "data")
  _run(servers[0], "cli", ["data", "--config", f"configs/demo.py:{MODEL}", "--workdir",
                           str(root), f"--config.data_dir={data_dir}"] + _sizes(), str(root))
  return data_dir


def _sizes():
  return [f"--config.world.sizes.{k}={v}" for k, v in WORLD.items()]


# Start-up and data loading, the dual solve (after the totals pass), and the card pass with the
# writes after it (the writes themselves take milliseconds: a later marker would mostly miss).
BALANCE_MARKERS = (("start", None, 0.5), ("log", "M4 totals", 0.05), ("log", "M4 margins", 0.05),
                   ("log", "M4 card", 0.3))


def _balance_point(rng, workdir, kills):
  """Balancing starts over after any kill (its outputs appear only at the end, m4.npz last),
  so any marker can come next: data loading, each streaming pass, each write. A finished run
  (a kill that came too late) loses its m4.npz, so the next one balances again, overwriting
  the outputs of the last: what a kill then hits is a rewrite."""
  del kills
  done = os.path.join(workdir, "balance", "m4.npz")
  if os.path.exists(done):
    os.remove(done)
  kind, value, most = rng.choice(BALANCE_MARKERS)
  return Point(kind, value, rng.uniform(0.0, most))


def _card(workdir):
  def drop_timings(x):
    if isinstance(x, dict):
      return {k: drop_timings(v) for k, v in x.items() if k != "seconds"}
    return x
  with open(os.path.join(workdir, "balance", "card.json")) as f:
    return drop_timings(json.load(f))


def test_balancing_killed_repeatedly_ends_identical(servers, world, cpu, tmp_path):
  def args(workdir):
    # Tolerances loose enough for a 200-example world to be feasible (outputs get written).
    return ["balance", "--config", f"configs/demo.py:{MODEL}", "--workdir", workdir,
            f"--config.data_dir={world}", "--config.progress=true",
            "--config.balance.eps_rep=0.05", "--config.balance.eps_assoc=0.05"] + _sizes()

  def victim(name):
    workdir = str(tmp_path / name)
    return lambda: _kill_repeatedly(servers[name == "SIGKILL"], "cli", args(workdir), workdir,
                                    _balance_point, SIGNALS[name], f"balance {name}",
                                    check_outputs)

  whole = str(tmp_path / "whole")
  _lanes([lambda: _run(servers[0], "cli", args(whole), whole), victim("SIGTERM")],
         [victim("SIGKILL")])
  for name in SIGNALS:
    killed = str(tmp_path / name)
    for file in ("m4.npz", "annotations.npz"):
      with np.load(os.path.join(whole, "balance", file), allow_pickle=False) as a, \
          np.load(os.path.join(killed, "balance", file), allow_pickle=False) as b:
        assert a.files == b.files
        for key in a.files:
          np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {file} {key} {SEED}")
    assert _card(killed) == _card(whole), (name, SEED)
    for file in ("card.md", "card.png"):
      with open(os.path.join(killed, "balance", file), "rb") as f:
        assert f.read(), file


# ---------------------------------------------------------------- the sweep


def _sweep_point(sig):
  def choose(rng, workdir, kills):
    """A step of the run in progress ahead of its checkpoint (its last step lands in its
    final evaluation), the first run's eval.json (= the second run's start), or start-up.
    The first kill in the second run's training restarts with --parallel 2: SIGTERM must
    reach the child run through the launcher, SIGKILL of the launcher must take it along."""
    first_done = os.path.exists(os.path.join(workdir, RUNS[0], "eval.json"))
    run = RUNS[first_done]
    done = checkpoint.latest_step(os.path.join(workdir, run)) or 0
    delay = rng.uniform(0, 0.05) if sig == signal.SIGKILL else 0.0
    if first_done and not any(k.point.parallel for k in kills) and done + 1 < SWEEP_STEPS:
      return Point("step", rng.randint(done + 1, SWEEP_STEPS - 1), delay, run, parallel=True)
    if not first_done and len(kills) >= KILLS - 3:  # leave kills for the second run
      return Point("file", f"{RUNS[0]}/eval.json", delay)
    if rng.random() < 0.4:
      return Point("start", delay=rng.uniform(0, 0.5))
    points = [Point("step", s, delay, run) for s in range(done + 1, min(done + 3, SWEEP_STEPS + 1))]
    if not first_done:
      points.append(Point("file", f"{RUNS[0]}/eval.json", delay))
    if not points:  # only the second run's evaluation is left
      points.append(Point("log", f"] {RUNS[1]}", rng.uniform(0.1, 0.3)))
    return rng.choice(points)
  return choose


def test_sweep_killed_repeatedly_resumes_without_redoing_runs(servers, world, cpu,
                                                             tmp_path):
  config = tmp_path / "micro_sweep.py"
  config.write_text(MICRO_SWEEP)
  finished = {}  # (victim, run) -> eval.json mtime when first seen

  def args(workdir):
    return ["--config", str(config), "--workdir", workdir, f"--config.data_dir={world}"]

  def check(workdir, sig, kill):
    check_outputs(workdir, sig, kill)
    for run in RUNS:
      path = os.path.join(workdir, run, "eval.json")
      if os.path.exists(path):
        mtime = finished.setdefault((workdir, run), os.stat(path).st_mtime_ns)
        assert os.stat(path).st_mtime_ns == mtime, f"{run} was redone ({SEED})"
    if kill.point.parallel and sig == signal.SIGTERM and kill.landed:
      # Forwarded: the child run saved a checkpoint at the step it names, and the launcher
      # waited for it and exits with 143.
      assert kill.code == PREEMPTED, (kill.log, SEED)
      with open(os.path.join(workdir, RUNS[1], "launcher.log"), errors="replace") as f:
        step = _sigterm_step(f.read())
      assert step is not None and checkpoint.latest_step(
          os.path.join(workdir, RUNS[1])) == step, (kill.log, SEED)

  def victim(name):
    workdir = str(tmp_path / name)
    return lambda: _kill_repeatedly(servers[name == "SIGKILL"], "sweep", args(workdir),
                                    workdir, _sweep_point(SIGNALS[name]), SIGNALS[name],
                                    f"sweep {name}", check, parallel_args=["--parallel", "2"])

  whole = str(tmp_path / "whole")
  (_, term), (kill,) = _lanes(
      [lambda: _run(servers[0], "sweep", args(whole), whole), victim("SIGTERM")],
      [victim("SIGKILL")])
  for kills in (term, kill):
    assert any(k.point.parallel and k.landed for k in kills), SEED  # child runs were hit
  for name in SIGNALS:
    killed = str(tmp_path / name)
    for run in RUNS:
      for file in ("eval.json", "eval_rows.json"):
        with open(os.path.join(whole, run, file)) as a, open(os.path.join(killed, run, file)) as b:
          assert json.load(a) == json.load(b), (name, run, file, SEED)
      assert _losses(killed, run) == _losses(whole, run), (name, run, SEED)
      mtime = os.stat(os.path.join(killed, run, "eval.json")).st_mtime_ns
      assert finished.get((killed, run), mtime) == mtime


# ---------------------------------------------------------------- the SIGTERM hook itself


def test_sigterm_flag_is_set_only_inside_and_restores_the_handler():
  from siglip_fair.train.loop import sigterm_flag
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *_: seen.append(True))
  try:
    with sigterm_flag() as flag:
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 10
      while not flag.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
      assert not seen  # the flag replaced the handler while training
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not seen:
      assert time.monotonic() < deadline
      time.sleep(0.01)
  finally:
    signal.signal(signal.SIGTERM, previous)
  # Off the main thread no handler is installed (Python allows none there).
  result = []
  thread = threading.Thread(target=lambda: result.append(_flag_off_main_thread()))
  thread.start()
  thread.join()
  assert result == [False] and signal.getsignal(signal.SIGTERM) is previous


def _flag_off_main_thread():
  from siglip_fair.train.loop import sigterm_flag
  with sigterm_flag() as flag:
    return flag.is_set()
