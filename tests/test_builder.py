"""Tests for the synthetic_world TFDS builder (ArrayRecord, no TensorFlow)."""
import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from siglip_fair.data import builder
from siglip_fair.data import world


def _tiny():
  cfg = world.default_config()
  # train crosses a generation chunk boundary.
  cfg.sizes = ml_collections.ConfigDict(
      dict(train=1050, objects=20, people=16, retrieval=24))
  return cfg


def _data_files(builder_dir):
  names = sorted(f for f in os.listdir(builder_dir) if ".array_record-" in f)
  return {f: open(os.path.join(builder_dir, f), "rb").read() for f in names}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  return root, builder.build(_tiny(), root)


def test_no_tensorflow_needed(built):
  assert "tensorflow" not in sys.modules


def test_builds_are_byte_identical(built, tmp_path):
  _, first = built
  second = builder.build(_tiny(), tmp_path)
  a, b = _data_files(first), _data_files(second)
  assert len(a) == len(world.SPLITS)  # one shard per split at this size
  assert a.keys() == b.keys()
  for name in a:
    assert a[name] == b[name], name


def test_build_reuses_a_complete_build(built):
  root, first = built
  stamps = {f: os.stat(os.path.join(first, f)).st_mtime_ns
            for f in _data_files(first)}
  assert builder.build(_tiny(), root) == first
  assert stamps == {f: os.stat(os.path.join(first, f)).st_mtime_ns
                    for f in _data_files(first)}


@pytest.mark.parametrize("split", world.SPLITS)
def test_data_source_serves_the_generated_examples(built, split):
  root, _ = built
  cfg = _tiny()
  source = builder.data_source(cfg, root, split)
  expected = world.generate_split(cfg, split)
  assert len(source) == builder.num_examples(cfg, split) == cfg.sizes[split]
  for i in range(len(source)):  # record i is example i: order is preserved
    ex = source[i]
    assert set(ex) == set(expected)
    for key, want in expected.items():
      got = np.asarray(ex[key])
      assert got.shape == want[i].shape, key
      np.testing.assert_array_equal(got, want[i], err_msg=key)
  ex = source[0]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
  assert ex["captions"].shape == (3,) and isinstance(ex["captions"][0], bytes)
  for key in ("s", "y", "w"):
    assert ex[key].dtype == np.uint8


def test_config_name_is_a_stable_hash_of_all_knobs(built):
  _, first = built
  cfg = _tiny()
  config = builder.builder_config(cfg)
  assert config.name == builder.builder_config(_tiny()).name
  assert os.path.basename(os.path.dirname(first)) == config.name
  assert json.loads(config.world_json) == cfg.to_dict()
  names = {config.name}
  for knob, value in [("seed", 1), ("association", 0.2), ("noise", 0.1)]:
    other = _tiny()
    other[knob] = value
    names.add(builder.builder_config(other).name)
  other = _tiny()
  other.sizes.people = 18
  names.add(builder.builder_config(other).name)
  assert len(names) == 5
  info = json.load(open(os.path.join(first, "dataset_info.json")))
  assert cfg.to_json(sort_keys=True, separators=(",", ":")) in info[
      "configDescription"]


def test_data_source_before_build_raises(tmp_path):
  with pytest.raises(ValueError, match="build"):
    builder.data_source(_tiny(), tmp_path, "train")


def test_bad_split_raises(built):
  root, _ = built
  with pytest.raises(ValueError, match="split"):
    builder.data_source(_tiny(), root, "test")


def test_m4_streams_annotations_straight_from_the_arrayrecord_split(built):
  import jax
  from siglip_fair import annotate
  from siglip_fair.balance import m4, shards, stream
  root, _ = built
  source = builder.data_source(_tiny(), root, "train")
  cfg = m4.default_config()
  cfg.pi, cfg.eta, cfg.optim.chunk_size = (0.5, 0.5), 0.7, 256
  from_records = stream.balance_stream([shards.RecordShard(source)], cfg, jax.random.key(0))
  truth = annotate.from_ground_truth(world.generate_split(_tiny(), "train"))
  in_memory = m4.balance(truth, cfg, jax.random.key(0))
  np.testing.assert_allclose(from_records.q, in_memory.q, atol=1e-6)
  np.testing.assert_array_equal(from_records.keep, in_memory.keep)
