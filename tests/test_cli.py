"""The command line: help texts, config errors and exit codes."""
import os
import subprocess
import sys

import pytest

from siglip_fair import cli

SUBCOMMANDS = ("demo", "data", "balance", "train", "eval", "report", "debias", "results",
               "config")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_says_what_each_subcommand_does(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  out = " ".join(capsys.readouterr().out.split())
  summary, description = cli._HELP[command]  # pylint: disable=protected-access
  assert " ".join(description.split()) in out and "--config" in out
  assert ("--workdir" in out) == (command != "config")


def test_module_entry_point_lists_whole_summaries():
  result = subprocess.run([sys.executable, "-m", "siglip_fair", "--help"],
                          capture_output=True, text=True, check=False)
  out = " ".join(result.stdout.split())
  assert result.returncode == 0
  for command in SUBCOMMANDS:
    summary, description = cli._HELP[command]  # pylint: disable=protected-access
    # The summary is a whole phrase, never a description cut at its first '.' or ':'.
    assert summary in out, (command, out)


def test_config_prints_the_resolved_config(capsys):
  assert cli.main(["config", "--config", "configs/study.py:data=balanced,seed=3",
                   "--config.batch_size=64", "--config.balance.eta=0.7"]) == 0
  out = capsys.readouterr().out
  import yaml  # pylint: disable=g-import-not-at-top  # ml_collections prints YAML
  shown = yaml.load(out, Loader=yaml.UnsafeLoader)  # tuples are tagged
  assert shown["batch_size"] == 64 and shown["balance"]["eta"] == 0.7
  assert shown["data_version"] == "balanced" and shown["seed"] == 3


PERSONAL = """
from configs import study


def get_config(arg=None):
  c = study.get_config(arg)
  c.batch_size = 48
  return c


def sweep(add):
  add(seed=0)
  add(seed=1)
"""


def test_personal_config_imports_shipped_configs_from_every_entry_point(tmp_path):
  """A config outside configs/ that builds on a shipped one loads through the installed
  `siglip-fair` script and launch/local.py, run from another folder."""
  mine = tmp_path / "elsewhere" / "mine.py"
  mine.parent.mkdir()
  mine.write_text(PERSONAL)
  script = os.path.join(os.path.dirname(sys.executable), "siglip-fair")
  env = {**os.environ, "PYTHONPATH": ""}
  shown = subprocess.run([script, "config", "--config", f"{mine}:seed=2"], cwd=tmp_path,
                         capture_output=True, text=True, check=False, env=env)
  assert shown.returncode == 0, shown.stderr
  assert "batch_size: 48" in shown.stdout and "seed: 2" in shown.stdout
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('l', {os.path.join(REPO, 'launch', 'local.py')!r})\n"
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
          "from siglip_fair import config\n"
          f"_, module = config.load_config_file({str(mine)!r})\n"
          "print(m.run_names(module, ''))\n")
  listed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, check=False, env=env)
  assert listed.returncode == 0, listed.stderr
  assert "seed=1" in listed.stdout


def test_unknown_override_fails_cleanly(tmp_path, capsys):
  code = cli.main(["train", "--workdir", str(tmp_path), "--config.optim.learning_rate=1"])
  err = capsys.readouterr().err
  assert code == 2
  assert "optim has no field 'learning_rate'" in err
  assert not any(tmp_path.iterdir())  # nothing was written


def test_wrong_type_and_missing_file_fail_cleanly(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path), "--config.batch_size=big"]) == 2
  assert "batch_size expects int" in capsys.readouterr().err
  assert cli.main(["train", "--workdir", str(tmp_path), "--config", "nope.py"]) == 2
  assert "does not exist" in capsys.readouterr().err
