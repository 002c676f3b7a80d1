"""`siglip-fair eval --config configs/released.py:...` (issue 18, item 4) end to end on a random
transformers CLIPModel folder: FairFace and Dollar Street built from tiny files written here,
CIFAR-100 and COCO from tfds mock data. The files training runs write are there, and the
metrics equal the same protocols computed from transformers' own embeddings (its processor and
tokenizer on the same raw images and prompts)."""
import csv
import json
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from configs import released as released_config
from siglip_fair import cli
from siglip_fair.data import datasets, dollar_street, faces
from siglip_fair.evaluate import bias, metrics, prompts

from test_datasets import _write_coco_metadata
from test_dollar_street import _write as write_dollar_street
from test_released_plugin import reference_images, reference_texts
from test_preprocess import _clip_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = '("a photo of a {}.",)'


def _fairface(root, n=16):
  """A FairFace manual folder: n validation faces (and 2 training ones) of random pixels and
  sizes, every race and both genders present."""
  rng = np.random.default_rng(0)
  manual = root / "fairface"
  for split, count in (("train", 2), ("val", n)):
    (manual / split).mkdir(parents=True)
    with open(manual / f"fairface_label_{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["file", "age", "gender", "race", "service_test"])
      for i in range(count):
        shape = (int(rng.integers(14, 30)), int(rng.integers(14, 30)), 3)
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            manual / split / f"{i}.jpg", quality=95)
        writer.writerow([f"{split}/{i}.jpg", "20-29", ("Male", "Female")[i % 2],
                         faces.FAIRFACE_RACES[i % 7], "True"])
  return manual


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(reference, folder, eval.json, data_dir): the eval command run once on every dataset."""
  root = tmp_path_factory.mktemp("released_eval")
  clip = (str(root / "clip"), *_clip_folder(root / "clip"))
  data_dir = root / "tfds"
  faces.build("fairface", _fairface(root), data_dir)
  write_dollar_street(root / "ds")
  with pytest.warns(UserWarning, match="skipped"):  # the helper's deliberately broken rows
    dollar_street.build(root / "ds", data_dir)
  _write_coco_metadata(data_dir)
  config = os.path.join(REPO, "configs", "released.py") + f":source=hf,path={clip[0]},"
  flags = f"data_dir={data_dir},k=5,bootstrap=20,batch=8"
  # FairFace and Dollar Street from the files built above; CIFAR-100 and COCO from tfds mock
  # data (deterministic examples, read again below for the reference).
  out, mocked = root / "out", root / "out_mock"
  assert cli.main(["eval", "--config", f"{config}datasets=fairface+dollar_street,{flags}",
                   "--workdir", str(out), "--config.eval_data.dollar_street.split=train",
                   "--config.evals.dollar_street.ks=(1, 5)"]) == 0  # 3 topics: top-1 informs
  records = {}
  for name, split in (("fairface", "validation"), ("dollar_street", "train")):
    src = datasets.load_source(name, split, data_dir=str(data_dir))
    records[name] = [src[i] for i in range(len(src))]
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.AUTO,
                              data_dir=str(data_dir)):
    assert cli.main(["eval", "--config", f"{config}datasets=cifar100+coco,{flags}", "--workdir",
                     str(mocked), f"--config.evals.cifar100_zeroshot.templates={TEMPLATE}"]) == 0
    src = datasets.load_source("cifar100", "test", data_dir=str(data_dir))
    records["cifar100"] = [src[i] for i in range(len(src))]
  result = {}
  for folder in (out, mocked):
    with open(folder / "eval.json") as f:
      result.update(json.load(f))
  return clip, out, result, records


def test_writes_what_training_runs_write(run):
  _, out, result, records = run
  assert len(records["fairface"]) == 16 and len(records["dollar_street"]) >= 8  # the files
  assert {int(r["race"]) for r in records["fairface"]} == set(range(7))
  for folder in (out, out.parent / "out_mock"):
    assert {"eval.json", "eval_rows.json", "summary.json", "summary.md",
            "released.json"} <= set(os.listdir(folder))
  assert result["step"] == 0
  for key in ("fairface/gender_acc", "fairface/gender_acc_lo", "fairface/race_acc_worst",
              "fairface/ab_mean", "fairface/gender_maxskew@5", "fairface/race_ndkl@5",
              "cifar100/top1", "cifar100/top5", "cifar100/rb", "coco/i2t_r1", "coco/t2i_r10",
              "dollar_street/top5", "dollar_street/top5/q1", "dollar_street/top5_disparity"):
    assert key in result, key
  with open(out / "eval_rows.json") as f:
    assert {r["metric"] for r in json.load(f)} >= {"fairface/gender_acc", "dollar_street/top5"}
  with open(out / "released.json") as f:
    spec = json.load(f)
  assert spec["released"]["family"] == "clip" and spec["preprocess"]["resize"] == "shorter"
  assert "fairface/race_acc" in (out / "summary.md").read_text()


def test_metrics_match_transformers_embeddings(run):
  clip, _, result, records = run
  # FairFace gender / race zero-shot accuracy.
  faces_emb = reference_images(clip, [r["image"] for r in records["fairface"]])
  for field, groups in (("gender", {g: list(w) for g, w in prompts.DEFAULT_GROUP_WORDS.items()
                                    if g in ("man", "woman")}),
                        ("race", {r: released_config.RACE_WORDS[r]
                                  for r in faces.FAIRFACE_RACES})):
    templates = prompts.DEFAULT_TEMPLATES if field == "gender" else released_config.PERSON
    texts, spans = prompts.prompt_sets(groups, templates)
    group_emb = metrics.prompt_ensemble(reference_texts(clip, texts), spans)
    labels = np.array([int(r[field]) for r in records["fairface"]])
    want = np.mean(np.argmax(faces_emb @ group_emb.T, axis=1) == labels)
    assert result[f"fairface/{field}_acc"] == pytest.approx(want, abs=1e-6), field
  # MaxSkew@5 over gender of the ten concepts, from scratch: log(share in top 5 / share).
  concepts = [c for pair in released_config.CONCEPT_PAIRS for c in pair]
  texts, spans = prompts.prompt_sets({c: [c] for c in concepts}, released_config.CELEBRITY)
  scores = metrics.prompt_ensemble(reference_texts(clip, texts), spans) @ faces_emb.T
  gender = np.array([int(r["gender"]) for r in records["fairface"]])
  prior = np.bincount(gender, minlength=2) / len(gender)
  skews = []
  for row in scores:
    top = gender[np.argsort(-row, kind="stable")[:5]]
    share = np.bincount(top, minlength=2) / 5
    skews.append(max(np.log(share[g] / prior[g]) for g in range(2) if share[g] > 0))
  assert result["fairface/gender_maxskew@5"] == pytest.approx(np.mean(skews), abs=1e-5)
  # CIFAR-100 zero-shot top-1 and RB on its object images.
  from siglip_fair.evaluate import classnames  # pylint: disable=g-import-not-at-top
  cifar = reference_images(clip, [r["image"] for r in records["cifar100"]])
  texts, spans = prompts.prompt_sets({c: [c] for c in classnames.CIFAR100_CLASSES},
                                     ["a photo of a {}."])
  class_emb = metrics.prompt_ensemble(reference_texts(clip, texts), spans)
  labels = np.array([int(r["label"]) for r in records["cifar100"]])
  assert result["cifar100/top1"] == pytest.approx(
      np.mean(np.argmax(cifar @ class_emb.T, axis=1) == labels), abs=1e-6)
  texts, spans = prompts.prompt_sets({g: prompts.DEFAULT_GROUP_WORDS[g] for g in ("man", "woman")},
                                     prompts.DEFAULT_TEMPLATES)
  man, woman = metrics.prompt_ensemble(reference_texts(clip, texts), spans)
  rb = 100 * (np.mean((cifar @ man > cifar @ woman) + 0.5 * (cifar @ man == cifar @ woman)) - 0.5)
  assert result["cifar100/rb"] == pytest.approx(rb, abs=1e-4)
  assert bias.POINTS == 100
  # Dollar Street top-5 per income quartile over the split's topics.
  ds = records["dollar_street"]
  topics = [r["topic"].decode() for r in ds]
  classes = sorted(set(topics))
  texts, spans = prompts.prompt_sets({c: [c] for c in classes}, prompts.DEFAULT_TEMPLATES)
  topic_emb = metrics.prompt_ensemble(reference_texts(clip, texts), spans)
  scores = reference_images(clip, [r["image"] for r in ds]) @ topic_emb.T
  labels = np.array([classes.index(t) for t in topics])
  rank = np.sum(scores > scores[np.arange(len(ds)), labels][:, None], axis=1)
  quartile = np.array([int(r["income_quartile"]) for r in ds])
  for k in (1, 5):
    correct = rank < k
    per_q = [np.mean(correct[quartile == q]) if np.any(quartile == q) else np.nan
             for q in range(4)]
    assert result[f"dollar_street/top{k}"] == pytest.approx(np.mean(correct), abs=1e-6)
    for q in range(4):
      assert result[f"dollar_street/top{k}/q{q + 1}"] == pytest.approx(per_q[q], abs=1e-6,
                                                                        nan_ok=True)
    assert result[f"dollar_street/top{k}_disparity"] == pytest.approx(
        per_q[3] - per_q[0], abs=1e-6, nan_ok=True)
  assert 0 < result["dollar_street/top1"] < 1


def test_config_arguments_and_errors(tmp_path):
  c = released_config.get_config("path=x.npz,datasets=utkface+cifar100,k=100")
  assert set(c.eval_data) == {"utkface", "cifar100"}
  assert c.evals.utkface_skew_race.ks == (100,) and c.tokenizer.lower is None
  assert c.evals.utkface_race.groups == list(faces.UTKFACE_RACES)
  with pytest.raises(ValueError, match=r"unknown datasets \['laion'\]"):
    released_config.get_config("path=x,datasets=laion")
  with pytest.raises(ValueError, match="imagenet_classes"):
    released_config.get_config("path=x,datasets=imagenet")
  argv = ["eval", "--config", os.path.join(REPO, "configs", "released.py") + ":path=" +
          str(tmp_path / "absent.npz"), "--workdir", str(tmp_path / "out")]
  assert cli.main(argv) == 1  # a clear error, no traceback (the message names the path)
