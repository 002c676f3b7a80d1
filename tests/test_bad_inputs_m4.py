"""Bad-input catalogue (see test_bad_inputs.py): the M4 (balance) inputs, fed to the
`siglip-fair balance` command line or to `balance.balance` where users meet them."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from siglip_fair import cli
from siglip_fair.balance import shards, stage

from bad_inputs import (CASE, N_TRAIN, TINY, _clear, run, world,  # noqa: F401  (fixtures)
                        write_log)


@pytest.fixture(scope="module", autouse=True)
def _log_messages():
  yield
  write_log()


# --------------------------------------------------------------------- M4 (balance) inputs

def _annotations(rng, n=N_TRAIN) -> dict:
  """Valid annotations of the tiny world's training split (2 groups, 10 labels)."""
  group = rng.integers(0, 2, n)
  label = rng.integers(0, 10, n)
  return dict(s=np.eye(2, dtype=np.float32)[group], known=np.ones(n, np.float32),
              y=np.eye(10, dtype=np.float32)[label], w=np.zeros((n, 10), np.float32),
              u=np.zeros(n, np.float32))


def test_annotations_wrong_shape(run, tmp_path):
  ann = _annotations(np.random.default_rng(0))
  ann["y"] = ann["y"].argmax(1).astype(np.float32)  # label indices instead of one-hot [N, c]
  shards.write_shards(ann, tmp_path / "ann", 2)
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("annotations_wrong_shape", err)
  assert "annotations-00000-of-00002.npz" in err


def test_annotations_nan(run, tmp_path):
  ann = _annotations(np.random.default_rng(1))
  ann["y"][3, 0] = np.nan
  shards.write_shards(ann, tmp_path / "ann", 2)
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("annotations_nan", err)
  assert "annotations-00000-of-00002.npz" in err


def _refused(case_id, ann, **overrides):
  """m4.balance on in-memory annotations raises the case's message before any solve; the
  exact-QP reference's `m4.prepare` refuses the same input with the same problem."""
  from siglip_fair import balance  # pylint: disable=g-import-not-at-top
  from siglip_fair.balance import m4  # pylint: disable=g-import-not-at-top
  cfg = m4.default_config()
  cfg.update(overrides)
  for call in (lambda: balance.balance(ann, cfg, jax.random.key(0)),
               lambda: m4.prepare(ann, cfg)):
    with pytest.raises(ValueError) as error:
      call()
    assert CASE[case_id].problem in str(error.value), str(error.value)
  _clear(case_id, str(error.value))


def test_annotations_utility_column():
  ann = _annotations(np.random.default_rng(3))
  _refused("annotations_utility_column", dict(ann, u=ann["u"][:, None]))


def test_annotations_groups_1d():
  ann = _annotations(np.random.default_rng(4))
  _refused("annotations_groups_1d", dict(ann, s=ann["s"].argmax(1).astype(np.float32)))


def test_annotations_labels_1d():
  ann = _annotations(np.random.default_rng(5))
  _refused("annotations_labels_1d", dict(ann, y=ann["y"].argmax(1).astype(np.float32)))


def test_annotations_no_groups():
  ann = _annotations(np.random.default_rng(6))
  _refused("annotations_no_groups", dict(ann, s=ann["s"][:, :0]))


def test_annotations_fractional_groups():
  ann = _annotations(np.random.default_rng(7))
  soft = dict(ann, s=np.where(np.arange(N_TRAIN)[:, None] % 3 == 0, 0.5, ann["s"]))
  _refused("annotations_fractional_groups", soft)
  # With the option on, [0, 1] memberships are accepted (read as probabilities) ...
  from siglip_fair import balance  # pylint: disable=g-import-not-at-top
  cfg = balance.default_config()
  cfg.soft_membership = True
  assert balance.balance(soft, cfg, jax.random.key(0)).q.shape == (N_TRAIN,)
  # ... but values outside [0, 1] never are.
  cfg.optim.steps = 0
  with pytest.raises(ValueError, match=r"'s'\] must lie in \[0, 1\]"):
    balance.balance(dict(ann, s=ann["s"] * 2), cfg, jax.random.key(0))


def test_annotations_extra_rows():
  from siglip_fair.balance import m4, stream  # pylint: disable=g-import-not-at-top
  ann = _annotations(np.random.default_rng(8))
  half = {k: v[:128] for k, v in ann.items()}
  extra = dict({k: v[128:] for k, v in ann.items()}, y=ann["y"][123:])  # 5 rows too many
  cfg = m4.default_config()
  with pytest.raises(ValueError) as error:
    stream.balance_stream([half, extra], cfg, jax.random.key(0))
  _clear("annotations_extra_rows", str(error.value))
  with pytest.raises(ValueError, match="'y' has shape \\(261, 10\\).*never cut"):  # one dict
    stream.balance_stream(dict(ann, y=np.concatenate([ann["y"], ann["y"][:5]])), cfg,
                          jax.random.key(0))


def test_annotations_nan_unused_field():
  ann = _annotations(np.random.default_rng(9))
  ann["u"][17] = np.nan
  _refused("annotations_nan_unused_field", ann, use_utility=False)


def test_annotations_shards_disagree(run, tmp_path):
  ann = _annotations(np.random.default_rng(10))
  shards.write_shards({k: v[:128] for k, v in ann.items()}, tmp_path / "ann", 1, prefix="a")
  narrow = dict({k: v[128:] for k, v in ann.items()}, y=ann["y"][128:, :8])
  shards.write_shards(narrow, tmp_path / "ann", 1, prefix="b")
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("annotations_shards_disagree", err)
  assert "b-00000-of-00001.npz" in err


def test_pickled_annotation_shard(run, tmp_path):
  ann = _annotations(np.random.default_rng(2))
  (tmp_path / "ann").mkdir()
  np.savez(tmp_path / "ann" / "part-0.npz", **dict(ann, s=np.array(
      [{"group": int(g)} for g in ann["s"].argmax(1)], dtype=object)))
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("pickled_annotation_shard", err)
  assert "part-0.npz" in err and "['s']" in err


def test_missing_annotations_dir(run, tmp_path):
  err = run("balance", f"--config.annotations_dir={tmp_path / 'absent'}")
  _clear("missing_annotations_dir", err)


def test_targets_not_summing_to_one(run):
  _clear("targets_not_summing_to_one", run("balance", "--config.balance.pi=(0.7,0.6)"))


def test_infeasible_constraints(run, tmp_path, world, capsys):
  # Keeping everything (η = 1) leaves the world's 30 % women as they are: the prevalence
  # targets (0.5, 0.5) cannot be met. The command refuses and writes nothing ...
  _clear("infeasible_constraints", run("balance", "--config.balance.eta=1.0"))
  # ... unless told to keep the infeasible result, which the card then names. A staging folder
  # that a killed run (SIGKILL: no clean-up) left behind goes at the same time.
  workdir = str(tmp_path / "allowed")
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  os.makedirs(os.path.join(workdir, f".tmp_balance.{stage._host()}.{dead.pid}.x1"))
  assert cli.main(["balance", "--workdir", workdir, *TINY, f"--config.data_dir={world}",
                   "--config.balance.eta=1.0", "--config.balance.allow_infeasible=true"]) == 0
  assert "verdict: infeasible" in capsys.readouterr().out
  with open(os.path.join(workdir, "balance", "card.json")) as f:
    card = json.load(f)
  assert card["verdict"] == "infeasible" and card["binding"][0].startswith("rep[")
  assert sorted(set(os.listdir(workdir)) - {".lock"}) == ["balance"]  # no staging folder left
