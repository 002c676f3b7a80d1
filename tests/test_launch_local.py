"""The local sweep launcher expands `sweep(add)` into named runs."""
import importlib.util
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
