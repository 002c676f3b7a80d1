"""Stop signals (train/signals.py): SIGINT is handled like SIGTERM, with its own exit status.

In-process: each test sends a signal to this process while a handler of ours is installed, and
puts the previous handlers back. The kill harness (test_kill_harness.py) sends them to real
training processes.
"""
import os
import signal
import time

import pytest

from siglip_fair.train import loop, signals


def _wait(predicate):
  # A hang guard only: Python runs the handler at the next bytecode of the main thread.
  deadline = time.monotonic() + 10
  while not predicate():
    assert time.monotonic() < deadline
    time.sleep(0.01)


@pytest.fixture
def handlers():
  """Our own recorders as the handlers outside the block; restored afterwards."""
  seen = []
  previous = {s: signal.signal(s, lambda signum, frame: seen.append(signum))
              for s in signals.STOP_SIGNALS}
  yield seen
  for s, handler in previous.items():
    signal.signal(s, handler)


def test_preempted_carries_the_signal_status():
  assert loop.Preempted is signals.Preempted  # launch/local.py imports it from loop
  assert loop.Preempted("stopped").code == 143  # the default: SIGTERM
  error = signals.Preempted("stopped", 130)
  assert isinstance(error, SystemExit) and error.code == 130 and str(error) == "stopped"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_stop_flag_records_the_first_signal_and_restores_handlers(handlers, sig, status):
  with signals.stop_flag(multiprocess=False) as flag:
    assert not flag.is_set()
    os.kill(os.getpid(), sig)
    _wait(flag.is_set)
    other = signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT
    os.kill(os.getpid(), other)  # a second signal does not change which one stopped the job
    time.sleep(0.05)
    assert not handlers  # the flag, not the outer handlers, received both
  assert (flag.name, flag.status) == (signal.Signals(sig).name, status)
  os.kill(os.getpid(), sig)  # outside the block the outer handler is back
  _wait(lambda: handlers == [sig])


def test_stop_flag_installs_nothing_in_multiprocess_jobs(handlers):
  with signals.stop_flag(multiprocess=True) as flag:
    os.kill(os.getpid(), signal.SIGINT)
    _wait(lambda: handlers == [signal.SIGINT])
  assert not flag.is_set()


def test_preempted_message_names_the_signal(capsys):
  with signals.stop_flag(multiprocess=False) as flag:
    flag.set(signal.SIGINT)
  error = signals.preempted(7, flag, is_lead=True)
  assert error.code == 130
  assert str(error) == ("training: SIGINT at step 7; checkpoint saved, rerun the same command "
                        "to resume")
  assert capsys.readouterr().err == str(error) + "\n"
  assert signals.preempted(7, signals.StopFlag(), is_lead=False).code == 143  # JAX's service


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_sigterm_raises_stops_at_once_on_either_signal(handlers, capsys, sig, status):
  name = signal.Signals(sig).name
  with pytest.raises(signals.Preempted) as raised:
    with loop.sigterm_raises("balance: SIGTERM; stopped, rerun the same command"):
      os.kill(os.getpid(), sig)
      _wait(lambda: False)  # the handler raises out of this wait
  assert raised.value.code == status
  assert str(raised.value) == f"balance: {name}; stopped, rerun the same command"
  assert capsys.readouterr().err == str(raised.value) + "\n"
  with pytest.raises(signals.Preempted, match="sweep: SIGINT now"):
    with signals.sigterm_raises("sweep: {signal} now"):
      os.kill(os.getpid(), signal.SIGINT)
      _wait(lambda: False)
  os.kill(os.getpid(), sig)  # the outer handlers are back
  _wait(lambda: handlers == [sig])
