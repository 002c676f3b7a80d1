"""Real-dataset loaders under tfds mock data, and the face builders on tiny folders."""
import csv
import os

import numpy as np
import fake_towers
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from google.protobuf import json_format
from tensorflow_datasets.core.proto import dataset_info_pb2

from siglip_fair.data import datasets, faces, pipeline
from siglip_fair.evaluate import classnames, prompts

N = 3


def _mock(**kw):
  return tfds.testing.mock_data(num_examples=N, **kw)


def _check_images(src, size):
  """All records; with a size, every image is uint8 [size, size, 3]."""
  recs = [src[i] for i in range(len(src))]
  for r in recs:
    assert r["image"].dtype == np.uint8 and r["image"].ndim == 3
    assert r["image"].shape[-1] == 3
    if size is not None:
      assert r["image"].shape == (size, size, 3)
  return recs


@pytest.mark.parametrize("name,split", [
    ("imagenet2012", "validation"), ("imagenet_v2", "test"), ("cifar100", "test")])
def test_classification_sources(name, split, tmp_path):
  with _mock(policy=tfds.testing.MockPolicy.USE_CODE):
    src = datasets.load_source(name, split, data_dir=tmp_path, image_size=16)
    assert len(src) == N
    for r in _check_images(src, 16):
      assert set(r) == {"image", "label"}
      assert r["label"].dtype == np.int64 and r["label"].shape == ()


def test_celeb_a_source(tmp_path):
  with _mock(policy=tfds.testing.MockPolicy.USE_CODE):
    src = datasets.load_source("celeb_a", "test", data_dir=tmp_path)
    r = src[0]
    assert r["image"].dtype == np.uint8 and r["image"].ndim == 3
    assert r["image"].shape[-1] == 3
    for f in ("gender", "young"):
      assert r[f].dtype == np.int64 and r[f] in (0, 1)
    assert r["attributes"].shape == (40,)
    assert r["gender"] == 1 - r["attributes"][datasets.CELEB_A_ATTRIBUTES.index("Male")]


def _write_coco_metadata(root):
  """Real coco_captions code imports TensorFlow; its prepared metadata doesn't."""
  bdir = root / "coco_captions" / "2014" / "1.1.0"
  bdir.mkdir(parents=True)
  tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(), "image/id": np.int64,
      "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
  }).save_config(os.fspath(bdir))
  proto = dataset_info_pb2.DatasetInfo(
      name="coco_captions", version="1.1.0", config_name="2014",
      file_format="array_record",
      splits=[dataset_info_pb2.SplitInfo(name=s, shard_lengths=[N])
              for s in ("test", "val", "restval")])
  (bdir / "dataset_info.json").write_text(json_format.MessageToJson(proto))


def test_coco_captions_source(tmp_path):
  _write_coco_metadata(tmp_path)
  with _mock(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=tmp_path):
    src = datasets.load_source("coco_captions", "test", data_dir=tmp_path,
                               image_size=8)
    assert len(src) == N
    for r in _check_images(src, 8):
      caps = r["captions"]
      assert caps.shape == (datasets.NUM_CAPTIONS,) and caps.dtype == object
      assert all(isinstance(c, bytes) for c in caps)
      assert r["image_id"].dtype == np.int64


def test_coco_caption_padding():
  ex = {"captions": {"text": np.array(["a", "b"], object), "id": np.arange(2)},
        "image/id": 7}
  assert list(datasets._coco(ex)["captions"]) == [b"a", b"b", b"a", b"b", b"a"]
  ex["captions"]["text"] = np.array([f"c{i}" for i in range(7)], object)
  assert len(datasets._coco(ex)["captions"]) == 5


def test_prepare_image():
  gray = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
  out = datasets.prepare_image(gray)
  assert out.shape == (6, 10, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # Center crop: a 6x10 image keeps columns 2..7, so no resize is needed.
  np.testing.assert_array_equal(datasets.prepare_image(gray, 6)[..., 0], gray[:, 2:8])
  rgba = np.zeros((5, 5, 4), np.uint8)
  assert datasets.prepare_image(rgba, 3).shape == (3, 3, 3)


def test_unknown_and_unprepared(tmp_path):
  with pytest.raises(ValueError, match="known:.*cifar100"):
    datasets.load_source("nope", "test")
  for name, hint in [("cifar100", "tfds build cifar100"),
                     ("imagenet2012", "--manual_dir"),
                     ("coco_captions", "tfds build coco_captions"),
                     ("fairface", "fairface_label_train.csv")]:
    with pytest.raises(datasets.DatasetNotPrepared, match="not prepared") as e:
      datasets.load_source(name, "test", data_dir=tmp_path)
    assert hint in str(e.value)
  assert not any(tmp_path.iterdir())  # nothing downloaded or written


def _jpeg(path, color, shape=(12, 8)):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.new("RGB", shape[::-1], color).save(path, format="JPEG")


def test_fairface_builder(tmp_path):
  manual = tmp_path / "fairface"
  rows = {"train": [("train/1.jpg", "20-29", "Male", "East Asian"),
                    ("train/2.jpg", "more than 70", "Female", "Latino_Hispanic"),
                    ("train/3.jpg", "0-2", "Female", "Middle Eastern")],
          "val": [("val/1.jpg", "3-9", "Male", "Indian")]}
  manual.mkdir()
  for split, rs in rows.items():
    with open(manual / f"fairface_label_{split}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["file", "age", "gender", "race", "service_test"])
      for i, (file, age, gender, race) in enumerate(rs):
        _jpeg(manual / file, (40 * i, 100, 200))
        w.writerow([file, age, gender, race, "True"])
  data_dir = tmp_path / "data"
  faces.build("fairface", manual, data_dir)
  src = datasets.load_source("fairface", "train", data_dir=data_dir, image_size=8)
  got = [(int(r["gender"]), int(r["age_group"]), int(r["race"]))
         for r in _check_images(src, 8)]
  assert got == [(0, 3, 3), (1, 8, 2), (1, 0, 6)]  # gender 0 = male, as world.GROUPS
  # Batched reads (the mock's __getitems__ is broken in TFDS 4.9, so here).
  batch = src.__getitems__([2, 0])
  np.testing.assert_array_equal(batch[1]["image"], src[0]["image"])
  assert int(batch[0]["race"]) == 6
  # What the evaluators read: fixed-size batches through the data pipeline.
  batches = list(pipeline.eval_batches(src, batch_size=2, fields=("image", "gender")))
  assert batches[0]["image"].shape == (2, 8, 8, 3)
  assert batches[1]["gender"].tolist() == [1, 0] and batches[1]["mask"].tolist() == [True, False]
  val = datasets.load_source("fairface", "validation", data_dir=data_dir)
  assert len(val) == 1 and val[0]["image"].shape == (12, 8, 3)
  assert (int(val[0]["gender"]), int(val[0]["age_group"]), int(val[0]["race"])) == (0, 1, 5)


def test_utkface_builder(tmp_path):
  manual = tmp_path / "utk"
  names = ["25_0_2_20170116174525125.jpg.chip.jpg",  # male, 20-29, Asian
           "75_1_0_20170109150557335.jpg",  # female, 70+, White
           "4_1_4_20170103.jpg",  # female, 3-9, Others
           "39_1_20170116174525125.jpg.chip.jpg",  # malformed: no race
           "x_0_1_2017.jpg"]  # malformed: no age
  for i, n in enumerate(names):
    _jpeg(manual / "UTKFace" / n, (50 * i, 0, 0))
  data_dir = tmp_path / "data"
  with pytest.warns(UserWarning, match="skipped 2 of 5"):
    faces.build("utkface", manual, data_dir)
  src = datasets.load_source("utkface", "train", data_dir=data_dir)
  got = sorted((int(r["age_group"]), int(r["gender"]), int(r["race"]))
               for r in _check_images(src, None))
  assert got == [(1, 1, 4), (3, 0, 2), (8, 1, 0)]


def test_face_builders_missing_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="fairface_label_train.csv"):
    faces.build("fairface", tmp_path / "absent", tmp_path / "data")
  (tmp_path / "wrong").mkdir()
  (tmp_path / "wrong" / "readme.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="lacks.*fairface_label_val.csv"):
    faces.build("fairface", tmp_path / "wrong", tmp_path / "data")
  with pytest.raises(FileNotFoundError, match=r"\[age\]_\[gender\]"):
    faces.build("utkface", tmp_path / "absent", tmp_path / "data")


def test_parse_utkface_name_and_age_groups():
  assert faces.parse_utkface_name("1_0_0_2016.jpg")["gender"] == 0  # male
  assert faces.parse_utkface_name("1_1_0_2016.jpg")["gender"] == 1
  assert faces.parse_utkface_name("1_2_0_2016.jpg") is None
  assert faces.parse_utkface_name("1_0_5_2016.jpg") is None
  edges = {0: 0, 2: 0, 3: 1, 9: 1, 10: 2, 19: 2, 20: 3, 69: 7, 70: 8, 116: 8}
  for age, group in edges.items():
    assert faces.age_group(age) == group, age


def test_classnames(tmp_path):
  assert len(classnames.CIFAR100_LABELS) == 100
  assert list(classnames.CIFAR100_LABELS) == sorted(classnames.CIFAR100_LABELS)
  assert "aquarium fish" in classnames.CIFAR100_CLASSES
  templates = classnames.CLIP_IMAGENET_TEMPLATES
  assert len(templates) == len(set(templates)) == 80
  texts, spans = prompts.prompt_sets({"cat": ["cat"]}, templates)
  assert len(texts) == 80 and texts[0] == "a bad photo of a cat."
  assert prompts.render(templates[0], "apple") == "a bad photo of an apple."
  f = tmp_path / "names.txt"
  f.write_text("tench\n\ngoldfish \n")
  assert classnames.read_class_names(f) == ("tench", "goldfish")
  with pytest.raises(ValueError, match="expected 1000"):
    classnames.imagenet_class_names(f)


def test_cifar100_zero_shot_evaluator_end_to_end(tmp_path):
  """The ZeroShot evaluator on (mock) CIFAR-100 with the CLIP templates and class names gives
  the top-k of a brute-force argsort over the same model's embeddings."""
  import jax
  import ml_collections
  from siglip_fair.evaluate import evaluators as ev
  from siglip_fair.evaluate import metrics
  from siglip_fair.models import embed_fns, make_model

  model = make_model(ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4"), text=dict(variant="mu", vocab_size=320, max_len=12),
      embed_dim=16)))
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                      np.ones((1, 12), np.int32))["params"]
  embed_images, embed_texts = embed_fns(model)
  templates = classnames.CLIP_IMAGENET_TEMPLATES[:3]
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    src = datasets.load_source("cifar100", "test", data_dir=tmp_path, image_size=16)
    context = ev.EvalContext(embed_images, embed_texts, fake_towers.WordHash(), {"cifar": src},
                             batch_size=4)
    config = {"zeroshot": dict(split="cifar", label_key="label",
                               classes=list(classnames.CIFAR100_CLASSES), templates=templates,
                               ks=(1, 50), bootstrap=dict(num_samples=0))}
    out = ev.run_all(ev.build_evaluators(config, context), params)
    records = [src[i] for i in range(len(src))]
  images = np.stack([pipeline.normalize_image(r["image"]) for r in records])
  labels = np.array([r["label"] for r in records])
  texts, spans = prompts.prompt_sets({c: [c] for c in classnames.CIFAR100_CLASSES}, templates)
  tokens = fake_towers.WordHash().encode(texts)
  class_emb = metrics.prompt_ensemble(np.asarray(embed_texts(params, tokens)),
                                      spans)
  scores = np.asarray(embed_images(params, images)) @ class_emb.T
  rank = np.sum(scores >= scores[np.arange(len(labels)), labels][:, None], axis=1) - 1
  for k in (1, 50):
    assert out[f"zeroshot/top{k}"] == pytest.approx(np.mean(rank < k), abs=1e-6)
  assert 0 < out["zeroshot/top50"] < 1  # an untrained model: top-50 of 100 is informative
