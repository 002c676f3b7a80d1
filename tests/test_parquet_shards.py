"""Parquet annotation shards named by global row range (balance/shards.py): the format the Beam
text annotation and the multi-host image annotation write and M4 streams."""
import os

import numpy as np
import pytest

from siglip_fair.balance import shards


def _ann(rng, n, m=3, c=4, p=2, known_2d=False, u=True):
  s = (rng.random((n, m)) < 0.4).astype(np.float32)
  ann = {"s": s, "known": (rng.random((n, m) if known_2d else n) < 0.8).astype(np.int32),
         "y": (rng.random((n, c)) < 0.3).astype(np.float32),
         "w": (rng.random((n, p)) < 0.5).astype(np.float32)}
  if u:
    ann["u"] = rng.normal(size=n).astype(np.float32)
  return ann


def test_shard_name_sorts_by_row_range():
  names = [shards.shard_name("a", lo, hi) for lo, hi in [(0, 9), (9, 100), (100, 10 ** 11)]]
  assert names == sorted(names)
  assert names[0] == "a-rows-000000000000-000000000009.parquet"
  with pytest.raises(ValueError, match="start <= stop"):
    shards.shard_name("a", 5, 4)
  with pytest.raises(ValueError, match="prefix"):
    shards.shard_name(".a", 0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parquet_round_trip_through_as_shards(tmp_path, seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(50, 300))
  ann = _ann(rng, n, known_2d=bool(seed % 2), u=seed != 2)
  cuts = np.sort(rng.choice(np.arange(1, n), size=3, replace=False))
  bounds = [0, *cuts.tolist(), n]
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    path = shards.write_parquet_shard(tmp_path / shards.shard_name("ann", lo, hi),
                                      {k: v[lo:hi] for k, v in ann.items()},
                                      row_group_size=int(rng.integers(7, 40)))
    assert os.path.exists(path)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
  ranges = shards.check_coverage(tmp_path, n, prefix="ann")
  assert [(a, b) for a, b, _ in ranges] == list(zip(bounds[:-1], bounds[1:]))
  got = {}
  for _, chunk in shards.iter_chunks(shards.as_shards(str(tmp_path)), 17):
    for k, v in chunk.items():
      got.setdefault(k, []).append(v)
  assert sorted(got) == sorted(ann)
  for k, v in ann.items():
    out = np.concatenate(got[k])
    assert out.shape == v.shape
    np.testing.assert_array_equal(out, v)
    if k in shards.inputs.MULTI_HOT:
      assert out.dtype == np.uint8  # stored compact
  assert got["u"][0].dtype == np.float32 if "u" in ann else True


def test_write_refuses_bad_shapes(tmp_path):
  rng = np.random.default_rng(0)
  ann = _ann(rng, 10)
  ann["y"] = ann["y"][:9]
  with pytest.raises(ValueError, match="'y' has shape"):
    shards.write_parquet_shard(tmp_path / "x.parquet", ann)
  assert not os.listdir(tmp_path)


def _write(tmp_path, lo, hi, prefix="ann"):
  ann = _ann(np.random.default_rng(lo), hi - lo)
  return shards.write_parquet_shard(tmp_path / shards.shard_name(prefix, lo, hi), ann)


def test_check_coverage_names_gaps_overlaps_and_mismatches(tmp_path):
  _write(tmp_path, 0, 10)
  _write(tmp_path, 20, 30)
  with pytest.raises(ValueError, match=r"rows \[10, 20\) are missing"):
    shards.check_coverage(tmp_path, prefix="ann")
  _write(tmp_path, 10, 20)
  assert len(shards.check_coverage(tmp_path, 30, prefix="ann")) == 3
  with pytest.raises(ValueError, match=r"rows \[30, 40\) are missing"):
    shards.check_coverage(tmp_path, 40, prefix="ann")
  with pytest.raises(ValueError, match="more rows than the dataset"):
    shards.check_coverage(tmp_path, 25, prefix="ann")
  _write(tmp_path, 15, 30)
  with pytest.raises(ValueError, match=r"overlaps.*\[15, 20\) twice"):
    shards.check_coverage(tmp_path, 30, prefix="ann")
  os.remove(tmp_path / shards.shard_name("ann", 15, 30))
  # A shard whose rows do not match its name (e.g. copied over by hand).
  os.replace(tmp_path / shards.shard_name("ann", 10, 20), tmp_path / shards.shard_name("ann", 10, 21))
  with pytest.raises(ValueError, match="holds 10 rows but its name says 11"):
    shards.check_coverage(tmp_path, prefix="ann")
  os.replace(tmp_path / shards.shard_name("ann", 10, 21), tmp_path / shards.shard_name("ann", 10, 20))
  _write(tmp_path, 0, 5, prefix="other")
  with pytest.raises(ValueError, match="other-rows-000000000000-000000000005"):
    shards.check_coverage(tmp_path, prefix="ann")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no annotation shards"):
    shards.check_coverage(empty, prefix="ann")
  assert shards.check_coverage(empty, 0, prefix="ann") == []
