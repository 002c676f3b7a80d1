"""The Dollar Street manual builder on a tiny folder written here, with broken rows."""
import csv
import zlib

import numpy as np
import PIL.Image
import pytest

from configs import debias as debias_config
from siglip_fair.data import datasets, dollar_street
from siglip_fair.debias import tasks

TOPICS = ["['cup', 'kitchen']", "stove", "['bed']"]


def _write(root, n=16):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    rel = f"assets/img_{i}.jpg"
    (root / "assets").mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / rel)
    rows.append({"id": f"id{i}", "country.name": "Chile",
                 "region.id": ["af", "am", "as", "eu"][i % 4],
                 "income": f"{10.0 * (i + 1) ** 1.5:.1f}", "topics": TOPICS[i % 3] if i < 14
                 else TOPICS[0], "imageRelPath": rel})
  bad = [dict(rows[0], id="missing", imageRelPath="assets/none.jpg"),
         dict(rows[0], id="broken", imageRelPath="assets/broken.jpg"),
         dict(rows[0], id="bad_income", income="n/a"),
         dict(rows[0], id="bad_region", **{"region.id": "xx"})]
  (root / "assets" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with open(root / "images_v2.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows + bad)
  return rows


def test_build_skips_broken_rows_and_keeps_the_fields(tmp_path):
  manual, data_dir = tmp_path / "ds", tmp_path / "tfds"
  with pytest.raises(datasets.DatasetNotPrepared, match="dollar_street.build"):
    datasets.load_source("dollar_street", "train", data_dir=data_dir)
  rows = _write(manual)
  with pytest.warns(UserWarning, match=r"skipped 4 of 20 rows: missing image 1, undecodable "
                                       r"image 1, bad income 1, bad region 1"):
    dollar_street.build(manual, data_dir)
  income = np.array([float(r["income"]) for r in rows])
  quartile = np.searchsorted(np.quantile(income, [0.25, 0.5, 0.75]), income, side="right")
  got = {}
  for split in ("train", "test"):
    src = datasets.load_source("dollar_street", split, data_dir=data_dir, image_size=8)
    raw = dollar_street.data_source(split, data_dir)
    for i in range(len(src)):
      rec, ex = src[i], raw[i]
      rid = ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]
      got[rid] = (split, rec)
      assert rec["image"].shape == (8, 8, 3)
  assert sorted(got) == sorted(r["id"] for r in rows)
  for i, r in enumerate(rows):
    split, rec = got[r["id"]]
    # The split rule, computed independently.
    assert split == ("test" if zlib.crc32(r["id"].encode()) % 5 == 0 else "train")
    assert rec["income_quartile"] == quartile[i]
    assert rec["region"] == ["af", "am", "as", "eu"].index(r["region.id"])
    assert rec["topic"].decode() == ["cup", "stove", "bed"][i % 3 if i < 14 else 0]


def test_first_topic_parses_lists_without_evaluating_code():
  assert dollar_street.first_topic("['toothbrush', 'bathroom']") == "toothbrush"
  assert dollar_street.first_topic("stove") == "stove"
  assert dollar_street.first_topic("[]") is None
  assert dollar_street.first_topic("[__import__('os')]") is None


def test_debias_task_keeps_the_most_frequent_topics(tmp_path):
  manual, data_dir = tmp_path / "ds", tmp_path / "tfds"
  _write(manual)
  with pytest.warns(UserWarning):
    dollar_street.build(manual, data_dir)
  cfg = debias_config.get_config("task=dollar_street").task
  cfg.update(dict(data_dir=str(data_dir), image_size=8, num_topics=2, val_fraction=0.2))
  task = tasks.load_task(cfg)
  assert task.num_classes == 2 and task.sensitive_names[0] == "income Q1"
  topic_of = {f"id{i}": ["cup", "stove", "bed"][i % 3 if i < 14 else 0] for i in range(16)}
  train_topics = [t for rid, t in topic_of.items() if zlib.crc32(rid.encode()) % 5]
  # The two most frequent training topics (ties to the first in sorted order); labels index
  # the kept topics in sorted order.
  kept = sorted(sorted(set(train_topics), key=lambda t: (-train_topics.count(t), t))[:2])
  for split in ("train", "val", "test"):
    assert set(np.unique(task.splits[split]["label"])) <= {0, 1}
  total = sum(len(task.splits[s]["label"]) for s in ("train", "val", "test"))
  assert total == sum(t in kept for t in topic_of.values())
  n_train_val = len(task.splits["train"]["label"]) + len(task.splits["val"]["label"])
  assert n_train_val == sum(t in kept for t in train_topics)
