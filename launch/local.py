"""Runs a config file's sweep on this machine, each run in its own workdir.

    python launch/local.py --config configs/study.py --workdir w/study
    python launch/local.py --config configs/study.py:scale=gpu --sweep sweep_gpu --parallel 2 \
        --workdir w/gpu

`<sweep>(add)` in the config file (default `sweep`) calls `add(**args)` once per run; the args
are merged into the ``get_config`` argument string after the colon and name the run's folder.
A run whose folder has `eval.json` and whose record (fingerprint.json: config, training data,
keep masks) matches what the sweep would run now is finished and skipped; an unfinished one
resumes from its checkpoints. So the launcher can be killed at any point and started again with
the same command: it redoes nothing that was finished. A run made from other inputs (another
`--config.total`, a rebuilt keep mask) is moved to `<workdir>/.stale/` and run again. Overrides (``--config.x=y``) apply to every run. Runs share
one data folder and one balancing folder under --workdir, prepared once before the first run.
With --parallel N, N runs train at once, each in its own process (which dies with the launcher).

SIGTERM (a scheduler's pre-emption notice) stops the sweep cleanly: it is forwarded to the
running child runs, each saves a checkpoint at the end of its current step and exits, and the
launcher exits with status 143 once they have; in-process (--parallel 1) training does the
same, and any other stage stops at once (its outputs are written atomically). Rerun the same
command to resume.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time


def run_names(module, base_arg: str, sweep: str = "sweep") -> list[tuple[str, str]]:
  """[(run name, get_config argument string)] for every `add(**args)` of `module.<sweep>`."""
  if not callable(getattr(module, sweep, None)):
    names = [n for n in dir(module) if n.startswith("sweep") and callable(getattr(module, n))]
    raise ValueError(f"{module.__file__} defines no {sweep}(add); its sweeps: {names or 'none'}.")
  runs = []

  def add(**args):
    extra = ",".join(f"{k}={v}" for k, v in sorted(args.items()))
    name = "_".join(f"{k}={v}" for k, v in sorted(args.items())).replace("/", "-") or "run"
    name = name.replace("%", "pct")
    runs.append((name, ",".join(filter(None, [base_arg, extra]))))

  getattr(module, sweep)(add)
  names = [n for n, _ in runs]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"{sweep} adds the same run twice: {twice}.")
  return runs


def _shared(config, root: str):
  config.data_dir = config.data_dir or os.path.join(root, "data")
  config.balance_dir = config.balance_dir or os.path.join(root, "balance")
  return config


def prepare(configs, root: str) -> None:
  """Builds the shared data and every balancing the runs need, once, before any run starts
  (parallel runs would otherwise race to write them)."""
  from siglip_fair import study
  from siglip_fair.data import versions
  done = set()
  for config in configs:
    data = study.prepare_data_in_turn(config, root)
    for version, _ in versions.parse_schedule(config.data_version):
      key = (config.data_dir, config.balance_dir, version)
      if version != "baseline" and key not in done:
        study.version_keep(config, root, data, version)
        done.add(key)


def run_fingerprint(config, root: str) -> dict:
  """The record (fingerprint.json) a run of `config` must carry to count as this sweep's run."""
  from siglip_fair import fingerprint, run_record, study
  from siglip_fair.data import versions
  masks = {}
  for version, _ in versions.parse_schedule(config.data_version):
    if version != "baseline":
      out = study.balance_dir(study.version_config(config, root, version), root)
      masks[version] = fingerprint.digest(fingerprint.read(out) or {})
    else:
      masks[version] = None
  return run_record.wanted(config, study.train_data_identity(config), masks)


def finished(run_dir: str, config, root: str) -> bool:
  """Whether `run_dir` holds this run, finished. A run made from other inputs is moved to
  `<root>/.stale/` (nothing is deleted) with one line saying what differs."""
  from siglip_fair import fingerprint
  if not os.path.isdir(run_dir):
    return False
  stored = fingerprint.read(run_dir)
  if stored is None and not os.path.exists(os.path.join(run_dir, "config.json")):
    return False  # never got as far as its record: resumes or starts afresh
  diffs = fingerprint.compare(stored, run_fingerprint(config, root))
  if not diffs:
    return os.path.exists(os.path.join(run_dir, "eval.json"))
  stale = os.path.join(root, ".stale", f"{os.path.basename(run_dir)}.{time.strftime('%Y%m%d-%H%M%S')}")
  os.makedirs(os.path.dirname(stale), exist_ok=True)
  os.replace(run_dir, stale)
  print(f"sweep: {os.path.basename(run_dir)} was run from other inputs ({'; '.join(diffs)}); "
        f"moved to {os.path.relpath(stale, root)}, running it again")
  return False


# Exit status after SIGTERM: 128 + the signal number, what schedulers read as "terminated".
PREEMPTED_STATUS = 128 + signal.SIGTERM
INTERRUPTED_STATUS = 128 + signal.SIGINT  # Ctrl-C: the run saved a checkpoint too


def _die_with_parent():
  # Linux: the child gets SIGKILL when the launcher dies, even by SIGKILL, so a restarted
  # launcher never races an orphaned run for the same folder. Not SIGTERM: a run would then
  # finish its step and save a checkpoint while the restarted launcher's run starts there. (A
  # SIGTERM to the launcher is forwarded, and the launcher waits for the runs to save.)
  if sys.platform.startswith("linux"):
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Sigterm:
  """The launcher's SIGTERM handler: with child runs alive it forwards the signal to them and
  sets `received` (the launcher then starts nothing new and waits for them); with none it
  stops the launcher at once with `loop.Preempted` (status 143)."""

  def __init__(self, running: dict):
    self.running, self.received = running, False

  def __call__(self, signum, frame):
    del frame
    self.received = True
    if not self.running:
      from siglip_fair.train.loop import Preempted  # pylint: disable=g-import-not-at-top
      message = "sweep: SIGTERM; stopped, rerun the same command to resume"
      print(message, file=sys.stderr, flush=True)
      raise Preempted(message)
    for proc, _ in self.running.values():
      if proc.poll() is None:
        proc.send_signal(signum)


def _child_argv(spec: str, workdir: str, overrides, config) -> list[str]:
  return [sys.executable, "-m", "siglip_fair", "train", "--config", spec, "--workdir", workdir,
          *[f"--config.{k}={v}" for k, v in overrides],
          f"--config.data_dir={config.data_dir}", f"--config.balance_dir={config.balance_dir}"]


def main(argv=None) -> int:
  from siglip_fair import config as cfglib
  overrides, rest = cfglib.split_override_args(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:ARGS] with a sweep(add).")
  parser.add_argument("--workdir", required=True, help="one sub-folder per run is made here.")
  parser.add_argument("--sweep", default="sweep", help="the sweep function (default: sweep).")
  parser.add_argument("--parallel", type=int, default=1, help="runs at once (processes).")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-host JAX job first (auto-detected, e.g. a TPU pod "
                           "slice where every host runs this same command).")
  args = parser.parse_args(rest)
  if args.parallel < 1 or (args.parallel > 1 and args.distributed):
    parser.error("--parallel must be >= 1, and 1 with --distributed.")
  if args.distributed:
    from siglip_fair.train import distributed
    distributed.initialize()
  path, _, base_arg = args.config.partition(":")
  try:
    _, module = cfglib.load_config_file(path)
    runs = run_names(module, base_arg, args.sweep)
    configs = {name: _shared(cfglib.get_config(f"{path}:{arg}", overrides), args.workdir)
               for name, arg in runs}
  except (cfglib.ConfigError, ValueError) as e:
    print(f"sweep: config error: {e}", file=sys.stderr)
    return 2
  start, failed, running = time.monotonic(), [], {}
  sigterm = _Sigterm(running)
  # Main thread only (Python's rule for signal handlers); the previous handler comes back.
  previous = signal.signal(signal.SIGTERM, sigterm)
  try:
    prepare(configs.values(), args.workdir)
    todo = [(name, arg) for name, arg in runs
            if not finished(os.path.join(args.workdir, name), configs[name], args.workdir)]
    print(f"sweep {args.sweep}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
          f"{len(todo)} to go", flush=True)
    failed = _run_all(todo, args, path, overrides, configs, running, sigterm, start)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if sigterm.received:
    print(f"sweep {args.sweep}: SIGTERM; the runs that were training saved a checkpoint; "
          "rerun the same command to resume", file=sys.stderr, flush=True)
    return PREEMPTED_STATUS
  if failed:
    print(f"sweep {args.sweep}: {len(failed)} run(s) failed: {failed}; see their "
          "launcher.log. Rerun this command to retry them.", file=sys.stderr)
    return 1
  print(f"sweep {args.sweep}: all {len(runs)} runs finished")
  return 0


def _run_all(todo, args, path, overrides, configs, running, sigterm, start) -> list[str]:
  """Runs (or starts, with --parallel) every run of `todo`; returns the names that failed."""
  failed = []
  for i, (name, arg) in enumerate(todo, 1):
    if sigterm.received:
      break
    workdir = os.path.join(args.workdir, name)
    if args.parallel == 1:
      from siglip_fair import study
      print(f"[{i}/{len(todo)}] {name}", flush=True)
      study.train_and_evaluate(configs[name], workdir)
    else:
      while len(running) >= args.parallel:
        failed += _reap(running)
      if sigterm.received:
        break
      print(f"[{i}/{len(todo)}] {name} (started)", flush=True)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, "launcher.log"), "ab")  # pylint: disable=consider-using-with
      running[name] = (subprocess.Popen(
          _child_argv(f"{path}:{arg}", workdir, overrides, configs[name]), stdout=log,
          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent), log)
    elapsed = time.monotonic() - start
    print(f"  {elapsed:.0f} s elapsed", flush=True)
  while running:
    failed += _reap(running)
  return failed


def _reap(running) -> list[str]:
  """Waits for one child to end; returns [its name] if it failed."""
  while True:
    for name, (proc, log) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        del running[name]
        if proc.returncode in (PREEMPTED_STATUS, -signal.SIGTERM, INTERRUPTED_STATUS,
                               -signal.SIGINT):
          status = "stopped by a signal (checkpoint saved if it was training)"
        else:
          status = "done" if proc.returncode == 0 else f"failed ({proc.returncode})"
        print(f"  {name}: {status}", flush=True)
        return [name] if proc.returncode else []
    time.sleep(0.5)


if __name__ == "__main__":
  sys.exit(main())
