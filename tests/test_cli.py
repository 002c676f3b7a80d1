"""The command line: help texts, config errors and exit codes."""
import subprocess
import sys

import pytest

from siglip_fair import cli

SUBCOMMANDS = ("demo", "data", "balance", "train", "eval", "report", "debias", "results")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_says_what_each_subcommand_does(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert cli._HELP[command].split()[0] in out and "--config" in out and "--workdir" in out


def test_module_entry_point_runs():
  result = subprocess.run([sys.executable, "-m", "siglip_fair", "--help"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0 and all(c in result.stdout for c in SUBCOMMANDS)


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
