"""grain pipeline over a tiny TFDS ArrayRecord dataset built in the test."""
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from siglip_fair.data import pipeline
from siglip_fair.data import tokenizer as tok_lib

N, H, W, K = 13, 4, 5, 3  # N is prime, so batches straddle epoch boundaries.


class TinyPipelineWorld(tfds.core.GeneratorBasedBuilder):
  """Record `r` has a constant image r, captions b"{r} {k}" and id r."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(H, W, 3), dtype=np.uint8),
        "captions": tfds.features.Tensor(shape=(K,), dtype=np.object_),
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for r in range(N):
      yield r, {"image": np.full((H, W, 3), 10 * r, np.uint8),
                "captions": np.array([f"{r} {k}".encode() for k in range(K)],
                                     dtype=object),
                "id": r}


class CaptionTokenizer:
  """Encodes b"{r} {k}" as [r + 100, k + 10, EOS, 0], so tests can read back
  which record and which caption a text row came from."""

  def encode(self, texts):
    out = np.zeros((len(texts), 4), np.int32)
    for row, t in zip(out, texts):
      r, k = map(int, (t.decode() if isinstance(t, bytes) else t).split())
      row[:3] = r + 100, k + 10, 1
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyPipelineWorld(data_dir=data_dir, file_format="array_record"
                    ).download_and_prepare()
  return tfds.data_source("tiny_pipeline_world", data_dir=data_dir,
                          split="train")


def _train(source, **kwargs):
  kwargs = dict(tokenizer=CaptionTokenizer(), global_batch_size=4, seed=7,
                read_options=grain.ReadOptions(num_threads=2)) | kwargs
  return pipeline.train_dataset(source, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _stream(batches, key="index"):
  return np.concatenate([b[key] for b in batches])


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_hold_the_records_they_index(source):
  batches = _take(iter(_train(source)), 5)
  for b in batches:
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, H, W, 3)
    assert b["text"].dtype == np.int32 and b["text"].shape == (4, 4)
    assert b["weight"].dtype == np.float32 and b["index"].dtype == np.int64
    for image, text, index in zip(b["image"], b["text"], b["index"]):
      record = source[int(index)]
      np.testing.assert_allclose(image, record["image"] / 127.5 - 1, atol=1e-6)
      assert text[0] - 100 == record["id"] and 0 <= text[1] - 10 < K
  np.testing.assert_array_equal(_stream(batches, "weight"), 1.0)


def test_real_tokenizer_encodes_one_of_the_records_captions(source, tmp_path):
  captions = [c for i in range(N) for c in source[i]["captions"]]
  tok = tok_lib.Tokenizer(tok_lib.train_sentencepiece(
      captions * 4, 64, str(tmp_path / "t.model")), max_len=6)
  for b in _take(iter(_train(source, tokenizer=tok)), 4):
    for text, index in zip(b["text"], b["index"]):
      options = tok.encode(source[int(index)]["captions"])
      assert (options == text).all(axis=1).any()


def test_every_epoch_is_a_fresh_permutation(source):
  stream = _stream(_take(iter(_train(source)), N))  # 4 * N = 4 epochs.
  epochs = stream.reshape(4, N)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(N))
  assert len({tuple(e) for e in epochs}) == 4


def test_caption_choice_is_random_but_seeded(source):
  texts = _stream(_take(iter(_train(source)), 3 * N), "text")
  assert set(texts[:, 1] - 10) == set(range(K))
  # The same record gets different captions across epochs.
  per_record = {}
  for r, k in texts[:, :2] - [100, 10]:
    per_record.setdefault(r, set()).add(k)
  assert any(len(ks) > 1 for ks in per_record.values())


def test_deterministic_by_seed(source):
  a = _take(iter(_train(source, seed=3)), 6)
  _assert_batches_equal(a, _take(iter(_train(source, seed=3)), 6))
  b = _take(iter(_train(source, seed=4)), 6)
  assert not np.array_equal(_stream(a), _stream(b))


def test_restored_state_resumes_exactly_across_epoch_boundary(source):
  it = iter(_train(source))
  _take(it, 2)  # 8 of 13 examples: the next 4 batches cross into epoch 2.
  state = json.loads(json.dumps(it.get_state()))  # Must be JSON-serialisable.
  expected = _take(it, 4)
  fresh = iter(_train(source))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


def test_orbax_checkpoint_manager_round_trip(source, tmp_path):
  it = iter(_train(source))
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 3
    fresh = mngr.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(iter(_train(source)))))["data"]
  _assert_batches_equal(_take(fresh, 3), expected)


def test_keep_mask_removes_examples(source):
  keep = np.zeros(N, bool)
  keep[[0, 3, 4, 8, 12]] = True
  stream = _stream(_take(iter(_train(source, keep=keep)), 10))
  assert set(stream) == set(np.flatnonzero(keep))  # Dropped never appear.
  # Each epoch (5 examples) is a permutation of the kept set.
  for e in stream.reshape(-1, 5):
    np.testing.assert_array_equal(np.sort(e), np.flatnonzero(keep))


def test_repeat_counts_repeat_examples(source):
  counts = np.arange(N) % 3  # 0, 1, 2, 0, 1, 2, ... -> 12 per epoch.
  stream = _stream(_take(iter(_train(source, keep=counts)), 3 * 12 // 4))
  for e in stream.reshape(3, 12):
    np.testing.assert_array_equal(np.bincount(e, minlength=N), counts)


def test_weights_follow_original_indices(source):
  weights = np.linspace(0.5, 2.0, N).astype(np.float32)
  keep = np.arange(N) % 2 == 0
  batches = _take(iter(_train(source, keep=keep, weights=weights)), 6)
  np.testing.assert_array_equal(_stream(batches, "weight"),
                                weights[_stream(batches)])


def test_process_shards_are_disjoint_and_cover(source):
  single = _take(iter(_train(source, global_batch_size=4)), 2 * N)
  shards = [_take(iter(_train(source, global_batch_size=4, process_index=p,
                              process_count=2)), 2 * N) for p in range(2)]
  for p in range(2):
    assert shards[p][0]["image"].shape[0] == 2
  # Stream positions: process p holds p, p + 2, ...; interleaving them gives
  # the single-process stream, so each step's local batches make up exactly
  # the global batch.
  for key in ("index", "text", "image", "weight"):
    interleaved = np.stack([_stream(s, key) for s in shards], 1)
    np.testing.assert_array_equal(
        interleaved.reshape((-1,) + interleaved.shape[2:]),
        _stream(single, key))
  # Within an epoch the processes read disjoint records that cover the data.
  first_epoch = [set(_stream(s)[: (N + 1 - p) // 2])  # 7 + 6 positions.
                 for p, s in enumerate(shards)]
  assert not first_epoch[0] & first_epoch[1]
  assert first_epoch[0] | first_epoch[1] == set(range(N))


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=5, process_count=2), "multiple of process_count"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(keep=np.ones(N - 1, bool)), "keep has shape"),
    (dict(keep=np.full(N, 0.5)), "keep has dtype"),
    (dict(keep=np.zeros(N, bool)), "No examples left"),
    (dict(weights=np.ones(N + 1)), "weights has shape"),
    (dict(weights=-np.ones(N)), "finite and >= 0"),
])
def test_train_dataset_rejects_bad_arguments(source, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _train(source, **kwargs)


def test_eval_batches_in_order_with_padding_mask(source):
  tokenizer = CaptionTokenizer()
  ds = pipeline.eval_batches(source, batch_size=5, tokenizer=tokenizer,
                             fields=("image", "id", "captions"))
  batches = list(ds)
  assert len(ds) == len(batches) == 3  # ceil(13 / 5)
  _assert_batches_equal(batches, list(ds))  # Re-iterable, deterministic.
  for b in batches:
    assert {k: v.shape[0] for k, v in b.items()} == dict.fromkeys(b, 5)
  mask = _stream(batches, "mask")
  np.testing.assert_array_equal(mask, np.arange(15) < N)
  np.testing.assert_array_equal(_stream(batches, "index"),
                                np.where(mask, np.arange(15), -1))
  images, texts = _stream(batches, "image"), _stream(batches, "text")
  ids = _stream(batches, "id")
  for i in range(N):
    record = source[i]
    np.testing.assert_allclose(images[i], record["image"] / 127.5 - 1,
                               atol=1e-6)
    assert ids[i] == record["id"]
    np.testing.assert_array_equal(texts[i],
                                  tokenizer.encode(record["captions"]))
  assert texts.shape == (15, K, 4)
  for padded in (images[N:], texts[N:], ids[N:]):
    assert not padded.any()
  assert all(c == b"" for c in _stream(batches, "captions")[N:].ravel())


def test_eval_batches_rejects_missing_fields(source):
  with pytest.raises(ValueError, match="no field"):
    pipeline.eval_batches(source, batch_size=4, fields=("pixels",))


def test_keep_to_indices_and_kept_source():
  counts = np.array([2, 0, 1, 3])
  np.testing.assert_array_equal(pipeline.keep_to_indices(counts, 4),
                                [0, 0, 2, 3, 3, 3])
  np.testing.assert_array_equal(
      pipeline.keep_to_indices(counts > 0, 4), [0, 2, 3])
  records = [{"x": np.int64(10 * i)} for i in range(4)]
  kept = pipeline.KeptSource(records, [3, 1, 3], np.array([0., 1., 2., 3.]))
  assert len(kept) == 3
  assert [(r["x"], r["index"], r["weight"]) for r in kept] == [
      (30, 3, 3.0), (10, 1, 1.0), (30, 3, 3.0)]
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    pipeline.KeptSource(records, [4])
