"""Stop signals: SIGTERM (a scheduler's pre-emption notice) and SIGINT (Ctrl-C).

Both stop a job cleanly. While training, `stop_flag` turns them into a flag the loop reads at
the end of each step (it then saves a checkpoint and raises `Preempted`); stages with nothing to
save use `sigterm_raises`, which raises `Preempted` at once. The exit status is 128 + the signal
number: 143 for SIGTERM (what schedulers read as "terminated"), 130 for SIGINT (a shell's
Ctrl-C status).

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is, including
inside a C++ call such as XLA compilation, which twice ended in SIGSEGV. A Python handler that
only sets a flag runs when the C++ call returns, so Ctrl-C during compilation is noticed after
it.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

# Signals that stop a job cleanly, in the order they are installed.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """A stop signal ended the job after its state was saved; exit status 128 + the signal
  (143 for SIGTERM, the default; 130 for SIGINT).

  A SystemExit, so it passes through `except Exception` handlers and ends the process with
  that status unless caught; `str(e)` is the one-line message (already printed to stderr).
  """

  def __init__(self, message: str, status: int = 128 + signal.SIGTERM):
    super().__init__(status)
    self.message = message
    self.status = status

  def __str__(self):
    return self.message


class StopFlag:
  """Which stop signal arrived first (`signum` None until one does); `is_set()` as for a
  threading.Event."""

  def __init__(self):
    self.signum = None
    self._event = threading.Event()

  def set(self, signum: int = signal.SIGTERM) -> None:
    if self.signum is None:
      self.signum = signum
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  @property
  def name(self) -> str:
    return signal.Signals(self.signum or signal.SIGTERM).name

  @property
  def status(self) -> int:
    return 128 + (self.signum or signal.SIGTERM)


def _restore(signum, previous) -> None:
  # None: a handler installed outside Python, which cannot be put back; use the default.
  signal.signal(signum, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def stop_flag(signums=STOP_SIGNALS, *, multiprocess: bool | None = None):
  """Yields a `StopFlag` that the given signals set while the block runs; the previous
  handlers are restored afterwards.

  Python handles signals in the main thread only, so elsewhere no handler is installed and the
  flag never fires. With several processes (`multiprocess`; default: jax.process_count() > 1)
  neither is installed: JAX's preemption service owns SIGTERM and agrees on a step across the
  processes, and a SIGINT noticed at different steps on different processes would leave the
  others waiting in a collective, so Ctrl-C keeps raising KeyboardInterrupt there.
  """
  flag = StopFlag()
  if multiprocess is None:
    import jax  # pylint: disable=g-import-not-at-top
    multiprocess = jax.process_count() > 1
  if threading.current_thread() is not threading.main_thread() or multiprocess:
    yield flag
    return
  previous = {}
  try:
    for signum in signums:
      previous[signum] = signal.signal(signum, lambda s, frame: flag.set(s))
    yield flag
  finally:
    for signum, handler in previous.items():
      _restore(signum, handler)


def sigterm_flag():
  """`stop_flag` for SIGTERM alone (yields a flag with `is_set()`)."""
  return stop_flag((signal.SIGTERM,))


@contextlib.contextmanager
def sigterm_raises(message: str):
  """Inside the block, SIGTERM or SIGINT prints `message` and raises `Preempted` right away,
  with status 143 or 130 (for stages with nothing to save: atomic writes in progress remove
  their temp files). `{signal}` in `message`, or else the word SIGTERM, becomes the name of the
  signal that came."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    text = (message.replace("{signal}", name) if "{signal}" in message
            else message.replace("SIGTERM", name))
    print(text, file=sys.stderr, flush=True)
    raise Preempted(text, 128 + signum)

  previous = {}
  try:
    for signum in STOP_SIGNALS:
      previous[signum] = signal.signal(signum, handler)
    yield
  finally:
    for signum, handler_ in previous.items():
      _restore(signum, handler_)


def preemption_sync_point(step: int) -> bool:
  """Multi-process: whether every process has reached the step JAX's preemption service
  chose after a SIGTERM on any of them (call it every step on every process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is switched off
    return False


def preempted(step: int, flag: StopFlag | None, is_lead: bool) -> Preempted:
  """The `Preempted` that ends training after the checkpoint at `step` was saved (SIGTERM when
  no flag was set: a multi-process pre-emption); process 0 prints its message."""
  name = flag.name if flag is not None and flag.is_set() else "SIGTERM"
  status = flag.status if flag is not None and flag.is_set() else 128 + signal.SIGTERM
  message = (f"training: {name} at step {step}; checkpoint saved, rerun the same command to "
             "resume")
  if is_lead:
    print(message, file=sys.stderr, flush=True)
  return Preempted(message, status)
