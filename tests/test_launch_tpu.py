"""The Cloud TPU launcher's commands for a multi-host slice, checked in dry-run mode."""
import importlib.util
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu():
  spec = importlib.util.spec_from_file_location("launch_tpu",
                                                os.path.join(REPO, "launch", "tpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _commands(capsys, argv, rc=0):
  assert _tpu().main(argv) == rc
  out = capsys.readouterr()
  lines = [line.removeprefix("[dry run] ") for line in out.out.splitlines()]
  return [shlex.split(line) for line in lines], out.err


BASE = ["--name", "fair", "--zone", "us-central2-b", "--accelerator_type", "v4-32",
        "--project", "proj", "--workdir", "gs://bucket/runs/b16", "--dry_run"]


def _remote_job(cmd):
  """The job argv inside `--command=cd ~/siglip_fair && [env ...] nohup JOB > log 2>&1 &`."""
  remote = next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")
  words = shlex.split(remote)
  assert words[:3] == ["cd", "~/siglip_fair", "&&"]
  assert words[-4:] == [">", "~/siglip_fair.log", "2>&1", "&"]
  job = words[words.index("nohup") + 1:words.index(">")]
  env = words[words.index("env") + 1:words.index("nohup")] if "env" in words else []
  return job, env, remote


def test_queued_spot_slice_creates_waits_installs_and_starts_every_host(capsys, monkeypatch):
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dry run ran a command"))
  cmds, _ = _commands(capsys, BASE + [
      "--queued", "--spot", "--config", "configs/siglip.py:variant=B/16,batch=4096",
      "--config.loss_impl=ring", "--config.evals.zeroshot.split", "my split",
      "--env", "JAX_LOG_COMPILES=1"])
  create, wait, archive, scp, install, run = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "fair"]
  assert {"--node-id=fair", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
          "--zone=us-central2-b", "--project=proj", "--spot"} <= set(create)
  assert wait[:4] == ["poll", "until", "ACTIVE:", "gcloud"] and "describe" in wait
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  # Every worker of the multi-host slice gets the package and runs the job.
  for cmd in (scp, install, run):
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd and "--project=proj" in cmd
  assert scp[4] == "scp" and scp[-4].endswith("siglip_fair.tar.gz")
  assert "jax[tpu]" in next(a for a in install if a.startswith("--command="))
  job, env, _ = _remote_job(run)
  assert job == ["python3", "-m", "siglip_fair", "train", "--distributed", "--config",
                 "configs/siglip.py:variant=B/16,batch=4096", "--workdir",
                 "gs://bucket/runs/b16", "--config.loss_impl=ring",
                 "--config.evals.zeroshot.split=my split"]
  assert env == ["JAX_LOG_COMPILES=1"]


def test_sweep_on_an_existing_vm_goes_through_the_local_runner(capsys):
  cmds, _ = _commands(capsys, BASE + ["--reuse", "--sweep", "--config", "configs/study.py"])
  assert [c[4] for c in cmds[1:]] == ["scp", "ssh", "ssh"]  # no create, no wait
  job, env, _ = _remote_job(cmds[-1])
  assert job[:5] == ["python3", "launch/local.py", "--distributed", "--sweep", "sweep"]
  assert env == []
  cmds, _ = _commands(capsys, BASE + ["--reuse", "--sweep", "sweep_gpu"])
  assert _remote_job(cmds[-1])[0][3:5] == ["--sweep", "sweep_gpu"]
  delete, = _commands(capsys, BASE + ["--delete"])[0]
  assert delete[3:6] == ["tpu-vm", "delete", "fair"]


def test_bad_arguments_are_named(capsys):
  _, err = _commands(capsys, [a for a in BASE if a not in ("--workdir", "gs://bucket/runs/b16")],
                     rc=2)
  assert "--workdir is required" in err
  _, err = _commands(capsys, BASE + ["--env", "NOVALUE"], rc=2)
  assert "KEY=VALUE" in err


def test_a_failing_command_stops_the_launch(capsys, monkeypatch):
  calls = []

  def fake_run(cmd, check):
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, 0 if len(calls) < 2 else 3)

  monkeypatch.setattr(subprocess, "run", fake_run)
  argv = [a for a in BASE if a != "--dry_run"]
  _, err = _commands(capsys, argv, rc=3)
  assert len(calls) == 2 and calls[1][1:4] == ["-C", REPO, "archive"]
  assert "exited with 3; stopped" in err
