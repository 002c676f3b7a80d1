"""Same config and seed, fresh workdirs: the same keep mask and balanced data order, bit for bit
on CPU (docs/RELIABILITY.md, "Determinism").

The rest is checked where it runs anyway: two uninterrupted training runs in fresh workdirs
(data order, losses, final parameters) and resumed ones in test_kill_harness.py; resume in
process in test_train.py; the world build in test_builder.py (byte-identical); the seeded data
stream in test_pipeline.py."""
import os

import numpy as np

from siglip_fair import config as cfglib
from siglip_fair import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _balance_config(data_dir):
  cfg = cfglib.get_config(os.path.join(REPO, "configs", "demo.py") + ":res=16,batch=16")
  cfg.world.sizes.update(dict(train=300, objects=20, people=20, retrieval=20))
  cfg.data_dir = str(data_dir)
  cfg.balance.eps_rep = cfg.balance.eps_assoc = 0.05  # feasible on a world this small
  return cfg


def _without_timings(x):
  if isinstance(x, dict):
    return {k: _without_timings(v) for k, v in x.items() if k != "seconds"}
  return x


def test_two_fresh_balancings_give_the_same_keep_mask_and_data_order(tmp_path):
  cfg = _balance_config(tmp_path / "data")
  data = study.prepare_data(cfg, str(tmp_path))
  results, orders = [], []
  for name in ("a", "b"):
    result = study.balance(cfg, str(tmp_path / name), data)
    results.append(result)
    batches = study.train_iterator(cfg, data, result["keep"])
    orders.append([next(batches) for _ in range(25)])  # > 1 epoch of the kept examples
  a, b = results
  np.testing.assert_array_equal(a["q"], b["q"])
  np.testing.assert_array_equal(a["keep"], b["keep"])
  assert 0 < a["keep"].mean() < 1
  assert _without_timings(a["card"]) == _without_timings(b["card"])
  for x, y in zip(*orders):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  seen = np.concatenate([batch["index"] for batch in orders[0]])
  assert a["keep"][seen].all() and len(set(seen)) == a["keep"].sum()
