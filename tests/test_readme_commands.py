"""The README's commands, run as written on tiny inputs: each documented command's own words,
followed by overrides that shrink the world, the model's depth and the run (later overrides
win). The quick-start demo runs in test_demo.py, the corpus imports in test_imports.py; the
sweep runs with every run shrunk to 2 steps."""
import json
import os
import subprocess
import sys

from doc_commands import readme_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.world.sizes.train=200", "--config.world.sizes.objects=20",
        "--config.world.sizes.people=20", "--config.world.sizes.retrieval=20",
        "--config.total=2", "--config.batch_size=8", "--config.eval_batch_size=20",
        "--config.eval_every=never", "--config.progress=false",
        "--config.model.image.depth=1", "--config.model.text.depth=1"]


def _commands(program, subcommand=None):
  return [c for c in readme_commands() if c.program == program and not c.inline
          and (subcommand is None or c.subcommand == subcommand)]


def _run(argv, cwd):
  env = {**os.environ, "PYTHONPATH": REPO}
  # The timeout only guards against a hang; no test here is judged by its time.
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


def test_readme_train_command_runs_as_written(tmp_path):
  (train,) = _commands("siglip_fair", "train")
  argv = [sys.executable if w == "python" else w for w in train.argv]
  # Its config path is relative to the repository, as the README is read from there.
  argv = [os.path.join(REPO, w) if w.startswith("configs/") else w for w in argv]
  result = _run(argv + TINY, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / train.argv[train.argv.index("--workdir") + 1]
  assert (workdir / "eval.json").exists() and (workdir / "config.json").exists()
  assert "training: fresh run, 0 of 2 steps" in result.stdout


def test_readme_tpu_launch_command_runs_as_written(tmp_path):
  (tpu,) = _commands("launch/tpu.py")
  argv = [sys.executable, os.path.join(REPO, "launch", "tpu.py"), *tpu.args]
  assert "--dry_run" in argv  # the README's form prints the gcloud commands, runs none
  result = _run(argv, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gcloud" in result.stdout and "siglip_fair" in result.stdout


SWEEP_TINY = [*TINY, *[f"--config.evals.{e}.bootstrap.num_samples=10"
                       for e in ("zeroshot", "rb", "ab", "gender_acc")]]


def test_readme_sweep_and_results_commands_run_as_written(tmp_path):
  """The local sweep (24 runs, two at a time) and `results` on it, each as the README writes
  it, with every run shrunk to 2 steps on a tiny world."""
  sweep, = _commands("launch/local.py")
  results, = [c for c in _commands("siglip_fair", "results")]
  argv = [sys.executable, os.path.join(REPO, "launch", "local.py"),
          *[os.path.join(REPO, w) if w.startswith("configs/") else w for w in sweep.args]]
  ran = _run(argv + SWEEP_TINY, tmp_path)
  assert ran.returncode == 0, (ran.stdout[-2000:], ran.stderr[-2000:])
  from configs import study  # pylint: disable=g-import-not-at-top
  runs = len(study.SEEDS) * len(study.CELLS)
  assert f"all {runs} runs finished" in ran.stdout
  collected = _run([sys.executable, "-m", "siglip_fair", *results.args], tmp_path)
  assert collected.returncode == 0, collected.stderr[-2000:]
  workdir = tmp_path / results.argv[results.argv.index("--workdir") + 1]
  table = (workdir / "results.md").read_text()
  # Every cell, each over the sweep's seeds of 2 steps x 8 examples, and the findings.
  assert table.count("16ex") >= len(study.CELLS) and "balanced_proxies" in table
  assert (workdir / "results_findings.json").exists()


def test_readme_debias_sensitivity_command_runs_as_written(tmp_path):
  """The world-task sensitivity analysis as the README writes it, on a tiny task: a 60-step
  two-tower model, 20-step target models, 400 training images."""
  (sens,) = [c for c in _commands("siglip_fair", "debias") if "analysis=sensitivity" in c.block]
  argv = [sys.executable if w == "python" else w for w in sens.argv]
  argv = [os.path.join(REPO, w) if w.startswith("configs/") else w for w in argv]
  tiny = ["--config.target.steps=20", "--config.target.jtt_first_steps=6",
          "--config.target.eval_every=10", "--config.clip.config.total=60",
          "--config.clip.config.world.sizes.train=800", "--config.clip.config.batch_size=32",
          "--config.clip.config.eval_every=100%", "--config.task.size=400",
          "--config.task.val_size=100", "--config.task.test_size=200"]
  result = _run(argv + tiny, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / sens.argv[sens.argv.index("--workdir") + 1]
  table = (workdir / "sensitivity.md").read_text()
  for factor in ("prompt_sets", "k", "refresh_every", "tau"):  # one row per value varied
    assert f"| {factor} |" in table, table
  assert (workdir / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_released_eval_command_runs_as_written(tmp_path, monkeypatch):
  """The released-model `eval` as the README writes it, from the README's folder: a tiny random
  transformers CLIPModel at its `path` and FairFace built from tiny files into the TFDS data dir
  (given as a later override, as the README's reader has TFDS's default one)."""
  from siglip_fair import cli  # pylint: disable=g-import-not-at-top
  from siglip_fair.data import faces  # pylint: disable=g-import-not-at-top
  from test_preprocess import _clip_folder  # pylint: disable=g-import-not-at-top
  from test_released_eval import _fairface  # pylint: disable=g-import-not-at-top
  (ev,) = [c for c in _commands("siglip_fair", "eval") if "configs/released.py" in c.block]
  assert ev.program == "siglip_fair" and ev.argv[0] == "siglip-fair"
  args = dict(kv.split("=", 1) for kv in ev.config.split(":", 1)[1].split(","))
  assert args["source"] == "hf" and "fairface" in args["datasets"].split("+")
  _clip_folder(tmp_path / args["path"])
  faces.build("fairface", _fairface(tmp_path), tmp_path / "tfds")
  argv = [os.path.join(REPO, w) if w.startswith("configs/") else w for w in ev.args]
  monkeypatch.chdir(tmp_path)
  assert cli.main(argv + [f"--config.data_dir={tmp_path / 'tfds'}"]) == 0
  workdir = tmp_path / ev.argv[ev.argv.index("--workdir") + 1]
  assert {"eval.json", "summary.md", "released.json"} <= set(os.listdir(workdir))
  result = json.loads((workdir / "eval.json").read_text())
  assert 0 <= result["fairface/gender_acc"] <= 1 and "fairface/race_maxskew@1000" in result
