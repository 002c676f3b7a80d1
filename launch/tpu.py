"""Runs a config (or its sweep) on a Cloud TPU VM slice, every host at once.

    python launch/tpu.py --name fair-v4 --zone us-central2-b --accelerator_type v4-32 \
        --config configs/siglip.py:variant=B/16 --workdir gs://bucket/runs/b16 --dry_run

Steps, each one `gcloud` command (printed with --dry_run, which runs nothing):
  1. create the TPU VM (or a queued resource with --queued, polled until ACTIVE; spot capacity
     with --spot) unless --reuse;
  2. pack the repository at HEAD (`git archive`), copy it to every worker and install it there
     with `jax[tpu]` (`--worker=all`);
  3. start the job on every worker with `--distributed`: `jax.distributed.initialize()` finds
     the coordinator, the process count and this host's index from the TPU metadata, so every
     host runs the same command. With --sweep the config's `sweep(add)` runs through
     `launch/local.py`, which skips finished runs and resumes unfinished ones, so a preempted
     slice is restarted by running this command again with --reuse.
Logs go to ~/siglip_fair.log on each worker; checkpoints and metrics to --workdir (use a gs://
bucket so they outlive the VM).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REMOTE_DIR = "siglip_fair"
ARCHIVE = "siglip_fair.tar.gz"
LOG = "siglip_fair.log"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gcloud_tpu(args, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *rest, f"--zone={args.zone}"]
  return cmd + ([f"--project={args.project}"] if args.project else [])


def create_command(args) -> list[str]:
  """Creates the slice: a TPU VM, or a queued resource (waits for capacity) with --queued."""
  if args.queued:
    cmd = _gcloud_tpu(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                      f"--accelerator-type={args.accelerator_type}",
                      f"--runtime-version={args.version}")
  else:
    cmd = _gcloud_tpu(args, "tpu-vm", "create", args.name,
                      f"--accelerator-type={args.accelerator_type}", f"--version={args.version}")
  return cmd + (["--spot"] if args.spot else [])


def wait_command(args) -> list[str]:
  """The queued resource's state; the launcher polls it until ACTIVE before copying."""
  return _gcloud_tpu(args, "queued-resources", "describe", args.name,
                     "--format=value(state.state)")


def _ssh(args, remote: str) -> list[str]:
  return _gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={remote}")


def install_commands(args) -> list[list[str]]:
  """Pack HEAD, copy it to every worker, unpack and install it with the TPU build of jax."""
  setup = " && ".join([
      f"rm -rf ~/{REMOTE_DIR}", f"mkdir -p ~/{REMOTE_DIR}",
      f"tar -xzf ~/{ARCHIVE} -C ~/{REMOTE_DIR}",
      f"python3 -m pip install -q -U {shlex.quote('jax[tpu]')}",
      f"python3 -m pip install -q -e ~/{REMOTE_DIR}"])
  local = os.path.join(tempfile.gettempdir(), ARCHIVE)
  return [
      ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={local}", "HEAD"],
      _gcloud_tpu(args, "tpu-vm", "scp", local, f"{args.name}:~/{ARCHIVE}", "--worker=all"),
      _ssh(args, setup)]


def job_argv(args, overrides: Sequence[str]) -> list[str]:
  """The command every host runs (the same on all of them)."""
  if args.sweep:
    argv = ["python3", "launch/local.py", "--distributed", "--sweep", args.sweep]
  else:
    argv = ["python3", "-m", "siglip_fair", args.command, "--distributed"]
  return argv + ["--config", args.config, "--workdir", args.workdir, *overrides]


def run_command(args, overrides: Sequence[str]) -> list[str]:
  env = " ".join(shlex.quote(e) for e in args.env)
  job = shlex.join(job_argv(args, overrides))
  # nohup + background: the ssh session returns while the job keeps running on every host.
  remote = (f"cd ~/{REMOTE_DIR} && {('env ' + env + ' ') if env else ''}"
            f"nohup {job} > ~/{LOG} 2>&1 &")
  return _ssh(args, remote)


def delete_command(args) -> list[str]:
  if args.queued:
    return _gcloud_tpu(args, "queued-resources", "delete", args.name, "--force", "--quiet")
  return _gcloud_tpu(args, "tpu-vm", "delete", args.name, "--quiet")


def plan(args, overrides: Sequence[str]) -> list[list[str]]:
  """Every command, in order."""
  if args.delete:
    return [delete_command(args)]
  commands = [] if args.reuse else [create_command(args)]
  if args.queued and not args.reuse:
    commands.append(WAIT + wait_command(args))
  return commands + install_commands(args) + [run_command(args, overrides)]


WAIT = ["<wait until ACTIVE>"]  # marks a polled command in the plan


def _wait_active(cmd: list[str], timeout_s: float, poll_s: float = 30.0) -> int:
  deadline = time.monotonic() + timeout_s
  while True:
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    state = out.stdout.strip()
    if out.returncode == 0 and state == "ACTIVE":
      return 0
    if state in ("FAILED", "SUSPENDED") or time.monotonic() > deadline:
      print(f"tpu.py: error: the queued resource is {state or 'unknown'} "
            f"({out.stderr.strip()[-300:]}); stopped.", file=sys.stderr)
      return 1
    time.sleep(poll_s)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              epilog="--config.<field>=<value> overrides go to every run.")
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None, help="default: gcloud's configured project.")
  p.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-32, v5litepod-16, v5p-64.")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version.")
  p.add_argument("--queued", action="store_true", help="create through queued resources.")
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity.")
  p.add_argument("--reuse", action="store_true", help="the VM exists: skip creating it.")
  p.add_argument("--delete", action="store_true", help="only delete the VM / queued resource.")
  p.add_argument("--command", default="train", choices=("train", "eval", "demo", "debias"),
                 help="siglip_fair subcommand (ignored with --sweep).")
  p.add_argument("--sweep", nargs="?", const="sweep", default=None, metavar="NAME",
                 help="run the config's sweep function (default name: sweep).")
  p.add_argument("--config", default="configs/siglip.py", help="FILE.py[:ARGS], repo-relative.")
  p.add_argument("--workdir", default="", help="output folder, ideally gs://bucket/...")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the job on every host (repeatable).")
  p.add_argument("--wait_timeout", type=float, default=3600.0,
                 help="seconds to wait for a queued resource to become ACTIVE.")
  p.add_argument("--dry_run", action="store_true", help="print the commands; run nothing.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  from siglip_fair.config.loading import ConfigError, split_override_args
  try:
    pairs, rest = split_override_args(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 2
  overrides = [f"--config.{key}={value}" for key, value in pairs]
  args = _parser().parse_args(rest)
  if not args.delete and not args.workdir:
    print("tpu.py: error: --workdir is required (a gs:// bucket keeps results after the VM).",
          file=sys.stderr)
    return 2
  bad_env = [e for e in args.env if "=" not in e or not e.split("=", 1)[0]]
  if bad_env:
    print(f"tpu.py: error: --env takes KEY=VALUE, got {bad_env}.", file=sys.stderr)
    return 2
  for cmd in plan(args, overrides):
    wait = cmd[:1] == WAIT
    cmd = cmd[1:] if wait else cmd
    print(("[dry run] " if args.dry_run else "+ ") + ("poll until ACTIVE: " if wait else "")
          + shlex.join(cmd), flush=True)
    if args.dry_run:
      continue
    if wait:
      if _wait_active(cmd, args.wait_timeout):
        return 1
    else:
      result = subprocess.run(cmd, check=False)
      if result.returncode:
        print(f"tpu.py: error: {cmd[0]} exited with {result.returncode}; stopped.",
              file=sys.stderr)
        return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
