"""A run's record (config.json, fingerprint.json, eval.json) is written once and never replaced:
rejected resumes leave it as it was, a finished run is not re-evaluated, and `eval` uses the
run's own config and writes its results beside the run's."""
import json
import os
import shutil

import pytest

from siglip_fair import cli

TINY = ["--config.world.sizes.train=256", "--config.world.sizes.objects=40",
        "--config.world.sizes.people=40", "--config.world.sizes.retrieval=40",
        "--config.progress=false", "--config.batch_size=32", "--config.eval_batch_size=40",
        "--config.total=4", "--config.eval_every=100%", "--config.ckpt_every=2",
        "--config.model.image.variant=mu/8", "--config.model.image.depth=1",
        "--config.model.text.depth=1"]
RECORD = ("config.json", "fingerprint.json", "eval.json", "eval_rows.json", "metrics.jsonl")


def _record(workdir) -> dict:
  out = {}
  for name in RECORD:
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      out[name] = (f.read(), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step run trained through the command line on a tiny world (non-default sizes, so a
  default world could not stand in for the run's own)."""
  root = tmp_path_factory.mktemp("record")
  workdir = str(root / "run")
  assert cli.main(["train", "--workdir", workdir, *TINY,
                   f"--config.data_dir={root / 'data'}"]) == 0
  return str(root), workdir


def test_eval_uses_the_runs_own_config_and_leaves_its_record(trained, capsys, tmp_path):
  root, workdir = trained
  before = _record(workdir)
  with open(os.path.join(workdir, "eval.json")) as f:
    final = json.load(f)
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", workdir]) == 0  # no --config: the run's own
  out = capsys.readouterr().out
  assert "eval @ step 4:" in out and "eval_step4.json" in out
  assert _record(workdir) == before
  with open(os.path.join(workdir, "eval_step4.json")) as f:
    again = json.load(f)
  # Same parameters, same config, same evaluators: the run's own final results again.
  for key in ("zeroshot/top1", "retrieval/i2t_r1", "bias/rb", "bias/ab_mean"):
    assert again[key] == pytest.approx(final[key], abs=1e-6), key
  # --output: a run one cannot write to stays untouched.
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_step*"))
  listing = sorted(os.listdir(copy))
  out_dir = str(tmp_path / "elsewhere")
  assert cli.main(["eval", "--workdir", copy, "--output", out_dir,
                   "--config.eval_batch_size=20"]) == 0
  assert sorted(os.listdir(copy)) == listing
  assert sorted(os.listdir(out_dir)) == ["eval_step4.json", "eval_step4_rows.json"]


def test_eval_refuses_training_fields(trained, capsys):
  _, workdir = trained
  before = _record(workdir)
  assert cli.main(["eval", "--workdir", workdir, "--config.model.embed_dim=16"]) == 2
  assert "eval cannot change --config.model.embed_dim" in capsys.readouterr().err
  # A --config file whose training fields differ from the run's (the default depth).
  assert cli.main(["eval", "--workdir", workdir, "--config", "configs/demo.py"]) == 2
  err = capsys.readouterr().err
  assert "outside the evaluation fields" in err and "depth 1 -> 2" in err
  assert _record(workdir) == before


@pytest.mark.parametrize("override,message", [
    ("--config.model.embed_dim=16", "but the config builds"),
    ("--config.keep_ckpts=0", "keep_ckpts must be >= 1"),
    ("--config.total=8", 'config.total "4" -> "8"'),
    ("--config.optim.lr=0.1", "config.optim.lr 0.001 -> 0.1"),
    ("--config.loss=softmax", 'config.loss "sigmoid" -> "softmax"'),
])
def test_rejected_resume_leaves_the_record(trained, capsys, tmp_path, override, message):
  root, workdir = trained
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  before = _record(run)
  code = cli.main(["train", "--workdir", run, *TINY, f"--config.data_dir={root}/data", override])
  err = capsys.readouterr().err
  assert code == 1 and message in err, err
  assert _record(run) == before


def test_finished_run_is_not_evaluated_again(trained, capsys):
  root, workdir = trained
  before = _record(workdir)
  assert cli.main(["train", "--workdir", workdir, *TINY, f"--config.data_dir={root}/data",
                   "--config.progress=true"]) == 0  # a presentation field may differ
  assert "training: already finished (step 4 of 4)" in capsys.readouterr().out
  assert _record(workdir) == before
