"""A training run that a test kills with SIGKILL and restarts (test_kill_resume.py).

    python tests/kill_process.py WORKDIR

Trains the toy model of test_train.py for STEPS steps; every batch the iterator hands out is
appended to <WORKDIR>/seen.jsonl as (position, example ids), and the final parameters go to
<WORKDIR>/params.npz.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from test_train import _config, _train_iter  # noqa: E402

STEPS = 40


class RecordingIterator:
  """Wraps an iterator and logs the position and example ids of every batch it hands out."""

  def __init__(self, it, path):
    self._it, self._path, self._position = it, path, 0

  def __next__(self):
    batch = next(self._it)
    with open(self._path, "a") as f:
      f.write(json.dumps([self._position, batch["label"].tolist(),
                          float(batch["image"].sum())]) + "\n")
    self._position += 1
    return batch

  def get_state(self):
    return {"inner": self._it.get_state(), "position": self._position}

  def set_state(self, state):
    self._it.set_state(state["inner"])
    self._position = state["position"]


def main():
  from siglip_fair.train.loop import train  # pylint: disable=g-import-not-at-top
  workdir = sys.argv[1]
  config = _config(total=STEPS, log_every=1, ckpt_every=3, eval_every=1000)
  it = RecordingIterator(_train_iter(), os.path.join(workdir, "seen.jsonl"))
  state = train(config, workdir, train_iter=it)
  leaves = jax.tree.leaves_with_path(jax.device_get(state.params))
  np.savez(os.path.join(workdir, "params.npz"), **{jax.tree_util.keystr(k): v for k, v in leaves})


if __name__ == "__main__":
  main()
