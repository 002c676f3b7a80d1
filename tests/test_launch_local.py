"""The local sweep launcher expands `sweep(add)` into named runs."""
import importlib.util
import json
import os

from siglip_fair import config as cfglib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher():
  spec = importlib.util.spec_from_file_location("launch_local", os.path.join(REPO, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_expands_into_named_runs_with_merged_args():
  _, module = cfglib.load_config_file(os.path.join(REPO, "configs", "siglip.py"))
  runs = _launcher().run_names(module, "steps=10")
  assert len(runs) == 6 and len({name for name, _ in runs}) == 6
  assert ("data=balanced_seed=2", "steps=10,data=balanced,seed=2") in runs
  # Every run's argument string is a valid config.
  for _, arg in runs:
    config = cfglib.get_config(os.path.join(REPO, "configs", "siglip.py") + ":" + arg)
    assert config.total == "10"


# Killing the runner mid-sweep and restarting it: tests/test_kill_harness.py (sweep).


MICRO_SWEEP = '''
from configs import demo


def get_config(arg=None):
  c = demo.get_config(",".join(filter(None, ["res=16,variant=mu/8,width=32,depth=1,embed=32,"
                                              "batch=8,steps=2", arg])))
  c.world.sizes.update(dict(train=200, objects=20, people=20, retrieval=20))
  c.warmup, c.eval_every = "1", "never"
  c.progress, c.eval_batch_size = False, 20
  for name in ("zeroshot", "retrieval", "gender_acc", "ab"):
    del c.evals[name]
  c.evals.rb.bootstrap.num_samples = 10
  c.study = dict(data=c.data_version, seed=c.seed)  # what `results` groups by
  return c


def sweep(add):
  add(data="baseline")
  add(data="balanced")
'''


def test_rerun_reuses_only_runs_made_from_the_same_inputs(tmp_path, capsys):
  """A changed config field reruns exactly the runs it affects (the old ones are kept aside);
  an unchanged rerun redoes nothing."""
  config = tmp_path / "micro.py"
  config.write_text(MICRO_SWEEP)
  launcher, workdir = _launcher(), str(tmp_path / "sweep")
  args = ["--config", str(config), "--workdir", workdir]

  def launch(*extra):
    assert launcher.main([*args, *extra]) == 0
    return capsys.readouterr().out

  def eval_mtimes():
    return {run: os.stat(os.path.join(workdir, run, "eval.json")).st_mtime_ns
            for run in ("data=baseline", "data=balanced")}

  assert "2 runs, 0 finished, 2 to go" in launch()
  first = eval_mtimes()
  assert "2 runs, 2 finished, 0 to go" in launch()
  assert eval_mtimes() == first
  # Another budget: the balanced run's keep mask changes, the baseline run is still valid.
  out = launch("--config.balance.eta=0.8")
  assert "2 runs, 1 finished, 1 to go" in out
  assert "data=balanced was run from other inputs" in out and "balance.eta 0.5 -> 0.8" in out
  second = eval_mtimes()
  assert second["data=baseline"] == first["data=baseline"]
  assert second["data=balanced"] != first["data=balanced"]
  # Another length (the issue's `--config.total=60`): every run is redone, none lost.
  out = launch("--config.balance.eta=0.8", "--config.total=3")
  assert "2 runs, 0 finished, 2 to go" in out and 'config.total "2" -> "3"' in out
  for run in ("data=baseline", "data=balanced"):
    with open(os.path.join(workdir, run, "eval.json")) as f:
      assert json.load(f)["step"] == 3
  stale = os.listdir(os.path.join(workdir, ".stale"))
  assert sorted(n.split(".")[0] for n in stale) == sorted(
      ["data=balanced", "data=balanced", "data=baseline"])
  # The runs set aside are not results: `results` and `report` see the current ones only.
  from siglip_fair.report import runs as runs_lib, sweep  # pylint: disable=g-import-not-at-top
  assert sorted(runs_lib.find_runs(workdir)) == ["data=balanced", "data=baseline"]
  assert len(sweep.collect(workdir)[0]) == 2
