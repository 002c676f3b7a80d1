"""End to end through the library entry point on a small synthetic world (open_clip style)."""
import json
import os

import numpy as np
import pytest

from siglip_fair import config as cfglib
from siglip_fair import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(data_dir, arg="steps=300,variant=mu/8,batch=64,depth=1"):
  cfg = cfglib.get_config(os.path.join(REPO, "configs", "siglip.py") + ":" + arg)
  cfg.world.sizes.update(dict(train=2000, objects=200, people=200, retrieval=200))
  cfg.data_dir = str(data_dir)
  cfg.eval_every = "50%"
  cfg.eval_batch_size = 100
  cfg.progress = False
  for sub in cfg.evals.values():
    if "bootstrap" in sub:
      sub.bootstrap.num_samples = 100
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A 300-step model (config, workdir, final metrics), shared by the tests that need one."""
  cfg = small_config(data_dir)
  workdir = tmp_path_factory.mktemp("trained")
  return cfg, workdir, study.train_and_evaluate(cfg, str(workdir))


def test_train_and_evaluate_learns_zero_shot(trained):
  cfg, tmp_path, final = trained
  # 10 object classes: chance is 0.1.
  assert final["zeroshot/top1"] > 0.6, final
  assert final["zeroshot/top1_lo"] <= final["zeroshot/top1"] <= final["zeroshot/top1_hi"]
  with open(tmp_path / "eval.json") as f:
    assert json.load(f)["step"] == 300
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "bias/rb" in r]
  assert [r["step"] for r in evals] == [150, 300]  # RB/AB over training
  assert records[-1]["loss"] < records[0]["loss"]


def test_balanced_version_trains_only_on_kept_examples(data_dir, tmp_path):
  cfg = small_config(data_dir, "steps=4,variant=mu/8,batch=32,depth=1,data=balanced")
  cfg.balance.pi, cfg.balance.eta = (0.5, 0.5), 0.7
  data = study.prepare_data(cfg, str(tmp_path))
  result = study.balance(cfg, str(tmp_path), data)
  keep = result["keep"]
  assert 0.6 < keep.mean() < 0.8
  batches = study.train_iterator(cfg, data, keep)
  seen = np.concatenate([next(batches)["index"] for _ in range(20)])
  assert keep[seen].all()
  assert os.path.exists(tmp_path / "balance" / "card.md")
  assert os.path.exists(tmp_path / "balance" / "card.png")
  with np.load(tmp_path / "balance" / "m4.npz") as f:
    assert "repeats" not in f.files


def test_balance_streams_annotation_shards_and_repeats(data_dir, tmp_path):
  from siglip_fair import annotate
  from siglip_fair.balance import write_shards
  cfg = small_config(data_dir, "steps=4,variant=mu/8,batch=32,depth=1,data=balanced")
  cfg.balance.pi, cfg.balance.eta, cfg.balance.repeats = (0.5, 0.5), 0.7, True
  cfg.annotate.source = "ground_truth"
  data = study.prepare_data(cfg, str(tmp_path))
  in_memory = study.balance(cfg, str(tmp_path / "a"), data)
  write_shards(study.annotations(cfg, data), tmp_path / "shards", 3)
  cfg.annotations_dir = str(tmp_path / "shards")
  streamed = study.balance(cfg, str(tmp_path / "b"), data)
  np.testing.assert_allclose(streamed["q"], in_memory["q"], atol=1e-6)
  np.testing.assert_array_equal(streamed["repeats"], in_memory["repeats"])
  assert streamed["annotations"] is None and in_memory["annotations"] is not None
  # Training on repeat counts: the balanced set has about the baseline's size.
  assert abs(streamed["repeats"].sum() / 2000 - 1.0) < 0.05
  batches = study.train_iterator(cfg, data, streamed["repeats"])
  seen = np.concatenate([next(batches)["index"] for _ in range(20)])
  assert (streamed["repeats"][seen] > 0).all()
  cfg.annotations_dir = str(tmp_path / "shards" / "annotations-00000-of-00003.npz")
  with pytest.raises(ValueError, match="holds 667 rows but the training split has 2000"):
    study.balance(cfg, str(tmp_path / "c"), data)
  assert annotate.KEYS  # the shards carried every annotation field


def test_zero_shot_image_annotations_from_a_trained_checkpoint(trained, tmp_path):
  from siglip_fair.annotate import zeroshot
  from siglip_fair.models.two_tower import embed_fns, make_model, temperature
  from siglip_fair.train.checkpoint import load_params
  cfg, workdir, _ = trained
  cfg = cfg.copy_and_resolve_references()
  cfg.annotate.source, cfg.annotate.image = "image", "zeroshot"
  data = study.prepare_data(cfg, str(tmp_path))
  with pytest.raises(ValueError, match="needs annotate.zeroshot.checkpoint"):
    study.annotations(cfg, data)
  cfg.annotate.zeroshot.checkpoint = str(workdir)
  ann = study.annotations(cfg, data)
  # The study's annotations are the annotator's on the checkpoint's parameters.
  towers = embed_fns(make_model(cfg.model))
  direct = zeroshot.ZeroShotAnnotator(*towers, data.tokenizer, temperature,
                                      cfg.annotate.zeroshot).annotate(
                                          load_params(str(workdir)), data.sources["train"])
  np.testing.assert_array_equal(ann["s"], direct["s"])
  report = study.annotation_report(cfg, data)
  truth = data.train_fields
  people = (np.asarray(truth["s"]).sum(1) > 0) & (ann["known"] > 0)
  accuracy = np.mean(np.argmax(ann["s"][people], 1) == np.argmax(truth["s"][people], 1))
  assert report["zeroshot/s/accuracy"] == pytest.approx(accuracy)
  assert accuracy > 0.8  # the tint cue is learnt in 300 steps


def test_data_schedule_switches_to_proxy_balanced_data(data_dir, tmp_path):
  cfg = small_config(data_dir, "steps=6,variant=mu/8,batch=32,depth=1")
  cfg.data_version = "baseline->balanced_proxies@50%"
  cfg.balance.pi, cfg.balance.eta = (0.5, 0.5), 0.7
  cfg.log_every, cfg.eval_every = "1", "100%"
  study.train_and_evaluate(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["data_version"] for line in f] == (
        ["baseline"] * 3 + ["balanced_proxies"] * 3)
  assert not os.path.exists(tmp_path / "balance")  # only the version in use was balanced
  with open(tmp_path / "balance_proxies" / "card.json") as f:
    card = json.load(f)
  assert card["settings"]["use_proxies"] is True


def test_real_eval_data_from_config(data_dir, tmp_path):
  """A FairFace folder built by its TFDS builder feeds an evaluator named in the config."""
  import csv
  import PIL.Image
  from siglip_fair.data import faces
  from siglip_fair.models import make_model
  import jax
  manual = tmp_path / "fairface"
  (manual / "val").mkdir(parents=True)
  (manual / "train").mkdir()
  PIL.Image.new("RGB", (20, 20), (0, 0, 0)).save(manual / "train/0.jpg")
  with open(manual / "fairface_label_train.csv", "w", newline="") as f:
    csv.writer(f).writerows([["file", "age", "gender", "race", "service_test"],
                             ["train/0.jpg", "3-9", "Male", "White", "True"]])
  with open(manual / "fairface_label_val.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file", "age", "gender", "race", "service_test"])
    for i in range(6):
      PIL.Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(manual / f"val/{i}.jpg")
      writer.writerow([f"val/{i}.jpg", "20-29", ("Male", "Female")[i % 2], "Indian", "True"])
  faces.build("fairface", manual, tmp_path / "tfds")
  cfg = small_config(data_dir, "steps=4,variant=mu/8,batch=32,depth=1")
  cfg.eval_data.ff = dict(dataset="fairface", split="validation", data_dir=str(tmp_path / "tfds"))
  cfg.evals = {"ff": dict(type="attribute_accuracy", split="ff", prefix="fairface/",
                          bootstrap=dict(num_samples=0))}
  data = study.prepare_data(cfg, str(tmp_path))
  sources = study.eval_sources(cfg, data)
  assert len(sources["ff"]) == 6 and sources["ff"][0]["image"].shape == (32, 32, 3)
  model = make_model(cfg.model)
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                      np.ones((1, 16), np.int32))["params"]
  from siglip_fair.evaluate import evaluators as ev
  out = ev.run_all(study.make_evaluators(cfg, data, model, bootstrap=False), params)
  # Both gender labels have 3 images, so each per-group accuracy is a multiple of 1/3.
  assert set(out) >= {"fairface/gender_acc", "fairface/gender_acc/man",
                      "fairface/gender_acc/woman"}
  for g in ("man", "woman"):
    assert out[f"fairface/gender_acc/{g}"] in (0.0, 1 / 3, 2 / 3, 1.0)
  cfg.eval_data.people = dict(dataset="fairface", split="validation")
  with pytest.raises(ValueError, match="taken by a built-in eval split"):
    study.eval_sources(cfg, data)
