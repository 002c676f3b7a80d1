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


def test_train_and_evaluate_learns_zero_shot(data_dir, tmp_path):
  cfg = small_config(data_dir)
  final = study.train_and_evaluate(cfg, str(tmp_path))
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


def test_resume_after_interruption_matches_uninterrupted_run(data_dir, tmp_path):
  cfg = small_config(data_dir, "steps=40,variant=mu/8,batch=32,depth=1")
  cfg.ckpt_every, cfg.log_every = "10", "1"
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  expected = study.train_and_evaluate(cfg, whole)
  study.train_and_evaluate(cfg, parts, stop_after=17)  # "killed" after step 17
  resumed = study.train_and_evaluate(cfg, parts)
  assert resumed == expected

  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [(r["step"], r["loss"]) for r in map(json.loads, f)]
  assert losses(parts) == losses(whole)


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
