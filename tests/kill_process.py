"""Victim processes for the kill harness (test_kill_harness.py).

    python tests/kill_process.py serve

is a fork server: it imports the stack once (without starting a JAX backend), then for every
JSON request on stdin, {"workload": ..., "args": [...], "log": path}, forks a child that runs
the workload with stdout/stderr in `log`, and answers {"pid": ...} at once and
{"pid": ..., "code": ..., "cpu": ...} when the child has ended (code: exit status, or -signal;
cpu: its CPU seconds). Each child
is a fresh process that starts its own backend; only the ~5 s of imports are shared, which is
what lets a test kill and restart runs dozens of times. Workloads:

  train WORKDIR TOTAL   the toy model of test_train.py for TOTAL steps (checkpoint every 2,
                        metrics every step); every batch handed out is appended to
                        <WORKDIR>/seen.jsonl as (position, example ids, pixel sum), and the
                        final parameters go to <WORKDIR>/params.npz.
  cli ARGS...           `python -m siglip_fair ARGS...` (e.g. balance).
  sweep ARGS...         `python launch/local.py ARGS...`.

    python tests/kill_process.py train WORKDIR TOTAL

runs one training directly.
"""
import json
import os
import signal
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "launch")]
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

from wrapped_iterator import WrappedIterator  # noqa: E402

CKPT_EVERY = 2


class RecordingIterator(WrappedIterator):
  """Wraps an iterator and logs the position and example ids of every batch it hands out."""

  def __init__(self, it, path):
    super().__init__(it)
    self._path = path

  def on_batch(self, batch, position):
    with open(self._path, "a") as f:
      f.write(json.dumps([position, batch["label"].tolist(),
                          float(batch["image"].sum())]) + "\n")
    return batch


def train(workdir, total):
  import jax  # pylint: disable=g-import-not-at-top
  from siglip_fair.io import atomic_savez  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.loop import train as train_loop  # pylint: disable=g-import-not-at-top
  from test_train import _config, _train_iter  # pylint: disable=g-import-not-at-top
  total = int(total)
  config = _config(total=total, log_every=1, ckpt_every=CKPT_EVERY, eval_every=10 * total,
                   batch_size=8, warmup=2)
  # One block per tower: fewer arrays make each (re)start and checkpoint cheaper.
  config.model.image.depth = config.model.text.depth = 1
  it = RecordingIterator(_train_iter(8), os.path.join(workdir, "seen.jsonl"))
  state = train_loop(config, workdir, train_iter=it)
  leaves = jax.tree.leaves_with_path(jax.device_get(state.params))
  atomic_savez(os.path.join(workdir, "params.npz"),
               **{jax.tree_util.keystr(k): v for k, v in leaves})
  return 0


def cli(*args):
  from siglip_fair import cli as cli_lib  # pylint: disable=g-import-not-at-top
  return cli_lib.main(list(args))


def sweep(*args):
  import local  # launch/local.py  # pylint: disable=g-import-not-at-top
  return local.main(list(args))


WORKLOADS = {"train": train, "cli": cli, "sweep": sweep}


def _child(request) -> None:
  """Runs one request in this (forked) process and never returns."""
  code = 1
  try:
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(os.devnull)  # pylint: disable=consider-using-with
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, signal.SIG_DFL)
    code = WORKLOADS[request["workload"]](*request["args"]) or 0
  except SystemExit as e:  # e.g. loop.Preempted: status 143 (SIGTERM) or 130 (SIGINT)
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, int) and e.code is not None:
      print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: the parent's state is not this child's to clean


def serve():
  # The stack, imported once; a JAX backend must not start here (forking one is unsafe).
  import grain  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import local  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import matplotlib.pyplot  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import test_train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from siglip_fair import cli as cli_lib, study  # noqa: F401  pylint: disable=g-import-not-at-top
  from siglip_fair.evaluate import evaluators  # noqa: F401  pylint: disable=g-import-not-at-top
  from siglip_fair.report import plots  # noqa: F401  pylint: disable=g-import-not-at-top
  from siglip_fair.train import loop  # noqa: F401  pylint: disable=g-import-not-at-top
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      _child(request)
    print(json.dumps({"pid": pid}), flush=True)
    _, status, usage = os.wait4(pid, 0)
    print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status),
                      "cpu": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "serve":
    serve()
  else:
    sys.exit(WORKLOADS[sys.argv[1]](*sys.argv[2:]))
