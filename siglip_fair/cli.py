"""Command line: ``python -m siglip_fair <subcommand> --config file.py[:arg] --workdir DIR``.

Every subcommand takes a config file (``get_config(arg)``), ``--config.key=value`` overrides and
a work directory. The heavy imports happen inside the subcommands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import sys
import tempfile
from typing import Callable, Sequence

_DEFAULT_CONFIG = {
    "demo": "configs/demo.py",
    "data": "configs/demo.py",
    "balance": "configs/demo.py",
    "train": "configs/siglip.py",
    "eval": "configs/siglip.py",
    "report": "configs/siglip.py",
    "debias": "configs/debias.py",
    "results": "configs/study.py",
}

_HELP = {
    "demo": ("Run the end-to-end study on the synthetic biased world: build the data, annotate it, "
             "balance it with M4, train a baseline and a balanced SigLIP model, evaluate quality and "
             "bias of both, and write summary.json / summary.md / plots to the workdir."),
    "data": ("Build the synthetic world as a TFDS ArrayRecord dataset (no download), train the "
             "sentencepiece tokenizer on its captions and report text-annotation precision/recall."),
    "balance": ("Annotate the training split (text lexicons, ground truth or zero-shot image "
                "annotation; or stream the annotation shards in --config.annotations_dir) and run "
                "M4 balancing with a progress bar per pass: writes keep probabilities, the keep "
                "mask (and repeat counts with --config.balance.repeats=true) and a data card "
                "(JSON, Markdown, PNG) to <workdir>/balance. Targets M4 cannot meet (verdict "
                "'infeasible') are an error that writes nothing, unless "
                "--config.balance.allow_infeasible=true."),
    "train": ("Train a two-tower model (SigLIP or CLIP loss) with periodic evaluation; resumes "
              "automatically from the checkpoints in the workdir."),
    "eval": "Evaluate the latest checkpoint in the workdir: zero-shot, retrieval, RB, AB, gender accuracy.",
    "report": ("Plot RB, AB and quality against examples seen for every run under the workdir "
               "(or the folders given with --runs) and tabulate their final metrics: writes "
               "report.png and report.md to the workdir."),
    "debias": ("CLIP-debias: infer sensitive groups from a two-tower model's similarities to "
               "attribute prompts, cluster them, and train a target model with loss-aware "
               "cluster re-sampling, against ERM, JTT, GroupDRO and the true-group oracles over "
               "several seeds (analysis=methods: results.md/png), or vary prompts, k, F and tau "
               "(analysis=sensitivity: sensitivity.md/png)."),
    "results": ("Collect every finished run of a sweep under the workdir (launch/local.py with "
                "configs/study.py) into one table by factor: mean ± std over seeds, paired "
                "Wilcoxon tests of each balanced cell against its baseline; writes results.csv, "
                "results.md and results.png to the workdir."),
}


def _config_root() -> str:
  """Default config files live in the repository's configs/ folder."""
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.dirname(here)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="siglip-fair",
      description="Fair contrastive image-text pretraining: M4 balancing, SigLIP/CLIP, bias evals.",
      epilog="Override any config field with --config.<dotted.key>=<value>.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
  for name, text in _HELP.items():
    p = sub.add_parser(name, help=text.split(":")[0].split(".")[0], description=text,
                       epilog="Override any config field with --config.<dotted.key>=<value>.")
    p.add_argument("--config", default=None,
                   help=f"config file with optional argument, FILE.py[:ARG] (default {_DEFAULT_CONFIG[name]}).")
    p.add_argument("--workdir", required=(name != "demo"),
                   default=("workdir/demo" if name == "demo" else None),
                   help="output folder; reruns resume from what is already there.")
    if name == "report":
      p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                     help="run folders to compare (default: every run under --workdir).")
    group = p.add_argument_group(
        "multi-host", "Join a multi-process JAX job before anything else runs (off by default).")
    group.add_argument("--distributed", action="store_true",
                       help="auto-detect the job (Cloud TPU pods, SLURM, Open MPI).")
    group.add_argument("--coordinator", default=None, help="process 0's HOST:PORT (manual).")
    group.add_argument("--num_processes", type=int, default=None)
    group.add_argument("--process_id", type=int, default=None)
  return parser


def _resolve_config(args, overrides):
  from siglip_fair import config as cfglib
  spec = args.config or os.path.join(_config_root(), _DEFAULT_CONFIG[args.command])
  return cfglib.get_config(spec, overrides)


# ------------------------------------------------------------------ checks before writing
# A bad config must fail before data are built or anything is written (config.json of an
# earlier run included). The library validates each field where it reads it, often late;
# these run the same validators first, each owned by the module that reads the field.


def _check_balance_config(config) -> None:
  from siglip_fair.balance import m4, shards
  m4.check_config(config.balance)
  if config.get("annotations_dir"):
    shards.as_shards(config.annotations_dir)  # opens headers only


def _check_train_config(config) -> None:
  from siglip_fair.config import durations
  from siglip_fair.data import versions
  from siglip_fair.evaluate import evaluators
  from siglip_fair.models.two_tower import make_model
  from siglip_fair.train import sharding
  from siglip_fair.train.losses import LOSS_NAMES
  from siglip_fair.train.optim import make_optimizer
  durations.check_durations(config)
  steps = durations.resolve_steps(config, num_examples=config.batch_size)
  schedule = versions.parse_schedule(config.data_version)
  if any(v != "baseline" for v, _ in schedule):
    _check_balance_config(config)
  from siglip_fair.train.state import NONFINITE_POLICIES
  if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={config.nonfinite!r}; use one of {NONFINITE_POLICIES} "
                     "(stop at a non-finite loss or gradient, or skip that step's update).")
  loss = config.get("loss", "sigmoid")
  if loss not in LOSS_NAMES:  # read by train/state.py, which would say so only after the data
    raise ValueError(f"config.loss={loss!r} is not a loss; use one of {LOSS_NAMES}.")
  make_model(config.model)
  make_optimizer(config.optim, steps.total_steps, steps.warmup_steps)
  sharding.check_batch_size(config.batch_size, sharding.make_mesh(config.get("mesh")))
  for name, sub in dict(config.evals).items():
    evaluators.evaluator_class(name, sub)


def _check_train_data(config, workdir, data) -> None:
  """Checks that need the data: eval datasets exist, evaluators find their splits, and
  balanced data versions are feasible (their M4 outputs are written here, as `balance`)."""
  from siglip_fair import study
  from siglip_fair.data import versions
  from siglip_fair.models.two_tower import make_model
  study.make_evaluators(config, data, make_model(config.model), bootstrap=False)
  for version, _ in versions.parse_schedule(config.data_version):
    if version != "baseline":
      _balance(study.version_config(config, workdir, version), workdir, data)


def _infeasible(card: dict, config) -> ValueError:
  binding = card["binding"]
  shown = ", ".join(binding[:5]) + (f" and {len(binding) - 5} more" if len(binding) > 5 else "")
  worst = card["largest_violation"]
  return ValueError(
      f"M4 cannot meet the balance targets (verdict: infeasible): binding {shown}; largest "
      f"violation {worst['name']} (|moment| {abs(worst['moment']):.4f} > eps "
      f"{worst['eps']:.4f}). Nothing was written. Loosen balance.eps_rep / balance.eps_assoc "
      f"(or balance.tolerance='relative'), lower the budget balance.eta={config.balance.eta}, "
      "or pass --config.balance.allow_infeasible=true to write the outputs with this verdict.")


def _balance(config, workdir, data=None):
  """`study.balance`, written only when the card is feasible (or balance.allow_infeasible):
  M4 writes into a staging folder beside the balance directory, moved into place at the end,
  so a failed or infeasible run leaves the workdir as it was."""
  from siglip_fair import study
  out = study.balance_dir(config, workdir)
  if os.path.exists(os.path.join(out, "m4.npz")):
    return study.balance(config, workdir, data)  # finished earlier: reused as it is
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  prefix = f".tmp_balance.{_host()}.{os.getpid()}."
  _remove_dead_staging(parent)
  staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    staged = config.copy_and_resolve_references()
    staged.balance_dir = staging
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      result = study.balance(staged, workdir, data)
    if result["card"]["verdict"] != "feasible" and not config.balance.get(
        "allow_infeasible", False):
      raise _infeasible(result["card"], config)
    os.makedirs(out, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda f: f == "m4.npz")  # m4.npz marks completion
    for name in names:
      os.replace(os.path.join(staging, name), os.path.join(out, name))
    print(printed.getvalue().replace(staging, out), end="")
    return result
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _host() -> str:
  return socket.gethostname().replace(".", "_")


def _remove_dead_staging(parent: str) -> None:
  """Staging folders left by balance runs of this host that were killed (SIGKILL skips the
  clean-up); those of live processes, e.g. parallel sweep runs, stay."""
  host = _host()
  for name in os.listdir(parent):
    parts = name.split(".")
    if name.startswith(".tmp_balance.") and len(parts) >= 5 and parts[2] == host:
      try:
        os.kill(int(parts[3]), 0)
      except ProcessLookupError:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      except (ValueError, PermissionError):
        pass  # not a pid of ours, or alive under another user


def _commands() -> dict[str, Callable]:
  def demo(config, workdir):
    from siglip_fair import demo as demo_lib
    _check_balance_config(config)
    _check_train_config(config)
    demo_lib.run(config, workdir)

  def data(config, workdir):
    from siglip_fair import study
    study.prepare_data(config, workdir, report=True)

  def balance(config, workdir):
    _check_balance_config(config)
    _balance(config, workdir)

  def train(config, workdir, stop_after=None):
    from siglip_fair import study
    _check_train_config(config)
    data = study.prepare_data(config, workdir)
    _check_train_data(config, workdir, data)
    return study.train_and_evaluate(config, workdir, data=data, stop_after=stop_after)

  def evaluate(config, workdir):
    import json
    from siglip_fair.train import checkpoint
    step = checkpoint.latest_step(workdir)
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {workdir!r}; train a model there "
                              "first (siglip-fair train --workdir ...).")
    # Training to the step that is already there restores without taking a step.
    result = train(config, workdir, stop_after=step)
    print(json.dumps(result, indent=1))

  def report(config, workdir, runs=None):
    del config
    from siglip_fair.report import runs as runs_lib
    found = ({os.path.basename(os.path.normpath(r)): r for r in runs} if runs
             else runs_lib.find_runs(workdir))
    for path in runs_lib.write_report(found, workdir):
      print(f"report: wrote {path}")

  def debias(config, workdir):
    from siglip_fair.debias import run as debias_run, sensitivity
    analyses = {"methods": debias_run.run, "sensitivity": sensitivity.run}
    if config.analysis not in analyses:
      raise ValueError(f"analysis={config.analysis!r}; use one of {sorted(analyses)}.")
    analyses[config.analysis](config, workdir)

  def results(config, workdir):
    del config
    from siglip_fair.report import sweep
    for path in sweep.write_results(workdir):
      print(f"results: wrote {path}")

  return {"demo": demo, "data": data, "balance": balance, "train": train, "eval": evaluate,
          "report": report, "debias": debias, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
  from siglip_fair.config.loading import ConfigError, split_override_args
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    overrides, rest = split_override_args(argv)
  except ConfigError as e:
    print(f"siglip-fair: error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)
  try:
    config = _resolve_config(args, overrides)
  except ConfigError as e:
    print(f"siglip-fair: config error: {e}", file=sys.stderr)
    return 2
  try:
    if args.distributed or args.coordinator is not None:
      from siglip_fair.train import distributed
      distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    extra = {"runs": args.runs} if args.command == "report" else {}
    _commands()[args.command](config, args.workdir, **extra)
  except (ValueError, FileNotFoundError) as e:
    # Library errors carry a message naming the problem; a traceback adds nothing for users.
    print(f"siglip-fair {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
