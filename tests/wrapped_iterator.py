"""A test iterator wrapper shared by test_nan_guard.py and kill_process.py."""


class WrappedIterator:
  """Wraps an iterator with get_state()/set_state() and counts the batches it hands out;
  subclasses see each batch with its 0-based position in `on_batch` and may replace it."""

  def __init__(self, it):
    self._it, self._position = it, 0

  def on_batch(self, batch, position):
    del position
    return batch

  def __next__(self):
    batch = self.on_batch(next(self._it), self._position)
    self._position += 1
    return batch

  def get_state(self):
    return {"inner": self._it.get_state(), "position": self._position}

  def set_state(self, state):
    self._it.set_state(state["inner"])
    self._position = state["position"]
