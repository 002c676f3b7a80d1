"""Content-addressed stages: changing a field that a stage's output depends on recomputes that
stage and the stages after it, never the ones before; an unchanged rerun reuses everything; a
recomputed output equals one computed afresh."""
import os

import numpy as np
import pytest

from siglip_fair import config as cfglib
from siglip_fair import fingerprint, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **changes):
  cfg = cfglib.get_config(os.path.join(REPO, "configs", "demo.py") + ":res=16")
  cfg.world.sizes.update(dict(train=300, objects=20, people=20, retrieval=20))
  cfg.data_dir, cfg.progress = str(data_dir), False
  for dotted, value in changes.items():
    parent, _, leaf = dotted.replace("__", ".").rpartition(".")
    node = cfg
    for part in filter(None, parent.split(".")):
      node = node[part]
    node[leaf] = value
  return cfg


def _mtimes(root) -> dict:
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def _balance(cfg, workdir, capsys):
  result = study.balance(cfg, workdir, study.prepare_data(cfg, workdir))
  return result, capsys.readouterr().out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def test_each_stage_recomputes_only_itself_and_what_follows(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "w")
  base, _ = _balance(_config(data_dir), workdir, capsys)
  world_files = _mtimes(data_dir)
  out = os.path.join(workdir, "balance")

  # Unchanged: reused, not even rewritten.
  balance_files = _mtimes(out)
  again, printed = _balance(_config(data_dir), workdir, capsys)
  assert "balance: reusing" in printed
  assert _mtimes(out) == balance_files
  np.testing.assert_array_equal(again["keep"], base["keep"])

  # A presentation field changes nothing either.
  _, printed = _balance(_config(data_dir, progress=True), workdir, capsys)
  assert "balance: reusing" in printed

  cases = [("balance", dict(balance__eta=0.75), "balance.eta 0.5 -> 0.75"),
           ("annotation", dict(annotate__source="text"),
            'annotate.source "ground_truth" -> "text"'),
           ("world", dict(world__seed=1), "data.world")]
  for stage, change, said in cases:
    cfg = _config(data_dir, **change)
    before = _mtimes(data_dir)
    result, printed = _balance(cfg, workdir, capsys)
    assert "was made from other inputs" in printed and said in printed, (stage, printed)
    if stage != "world":  # the world is reused as it was: not a file rewritten
      assert _mtimes(data_dir) == before, stage
    else:  # a new world beside the old one, which stays as it was
      after = _mtimes(data_dir)
      assert {k: after[k] for k in world_files} == world_files
      assert len(after) > len(world_files)
    # The recomputed outputs are what a fresh workdir computes from the same config.
    fresh, _ = _balance(cfg, str(tmp_path / f"fresh_{stage}"), capsys)
    np.testing.assert_array_equal(result["keep"], fresh["keep"])
    np.testing.assert_allclose(result["q"], fresh["q"])
    assert fingerprint.read(out) == fingerprint.read(str(tmp_path / f"fresh_{stage}" / "balance"))
  assert not [n for n in os.listdir(tmp_path / "w") if n.startswith(".tmp_balance")]


def test_kill_before_the_marker_recomputes(data_dir, tmp_path, capsys):
  """Outputs without fingerprint.json (a run killed before its last rename, or an older
  version) are never reused."""
  workdir = str(tmp_path / "w")
  cfg = _config(data_dir)
  _balance(cfg, workdir, capsys)
  os.remove(os.path.join(workdir, "balance", fingerprint.FILENAME))
  _, printed = _balance(cfg, workdir, capsys)
  assert "no fingerprint recorded" in printed and "recomputing" in printed
  assert fingerprint.read(os.path.join(workdir, "balance")) is not None


def test_annotation_shards_are_part_of_the_fingerprint(data_dir, tmp_path, capsys):
  from siglip_fair.balance import write_shards
  cfg = _config(data_dir)
  data = study.prepare_data(cfg, str(tmp_path))
  ann = study.annotations(cfg, data)
  write_shards(ann, tmp_path / "shards", 2)
  cfg.annotations_dir = str(tmp_path / "shards")
  workdir = str(tmp_path / "w")
  first = study.balance(cfg, workdir, data)
  capsys.readouterr()
  # Shards re-written with other annotations (the groups of the first half of the rows
  # swapped; swapping every row's would be the same problem with the groups renamed, whose
  # optimum at targets (0.5, 0.5) is the same q): recomputed.
  flipped = dict(ann)
  flipped["s"] = ann["s"].copy()
  half = len(ann["s"]) // 2
  flipped["s"][:half] = ann["s"][:half, ::-1]
  write_shards(flipped, tmp_path / "shards", 2)
  second = study.balance(cfg, workdir, data)
  printed = capsys.readouterr().out
  assert "was made from other inputs" in printed and "annotate.files" in printed
  assert not np.array_equal(first["q"], second["q"])
