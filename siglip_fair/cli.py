"""Command line: ``python -m siglip_fair <subcommand> --config file.py[:arg] --workdir DIR``.

Every subcommand takes a config file (``get_config(arg)``), ``--config.key=value`` overrides and
a work directory. The heavy imports happen inside the subcommands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Sequence

_DEFAULT_CONFIG = {
    "demo": "configs/demo.py",
    "data": "configs/demo.py",
    "balance": "configs/demo.py",
    "train": "configs/demo.py",
    "eval": "configs/demo.py",
    "report": "configs/demo.py",
    "debias": "configs/debias.py",
    "results": "configs/study.py",
    "config": "configs/demo.py",
}

# (one-line summary for the top-level --help, full description for `<subcommand> --help`)
_HELP = {
    "demo": ("the end-to-end study: world, M4, baseline vs balanced SigLIP, report",
             "Run the end-to-end study on the synthetic biased world: build the data, annotate "
             "it, balance it with M4, train a baseline and a balanced SigLIP model, evaluate "
             "quality and bias of both, and write summary.json / summary.md / plots to the "
             "workdir."),
    "data": ("build the synthetic world and tokenizer; report annotation precision/recall",
             "Build the synthetic world as a TFDS ArrayRecord dataset (no download), train the "
             "sentencepiece tokenizer on its captions and report text-annotation "
             "precision/recall."),
    "balance": ("annotate the training split and run M4: keep mask and data card",
                "Annotate the training split (text lexicons, ground truth or zero-shot image "
                "annotation; or stream the annotation shards in --config.annotations_dir) and "
                "run M4 balancing with a progress bar per pass: writes keep probabilities, the "
                "keep mask (and repeat counts with --config.balance.repeats=true) and a data "
                "card (JSON, Markdown, PNG) to <workdir>/balance. Outputs made from the same "
                "data and config are reused; otherwise they are recomputed. Targets M4 cannot "
                "meet (verdict 'infeasible') are an error that writes nothing, unless "
                "--config.balance.allow_infeasible=true."),
    "train": ("train a two-tower model (SigLIP or CLIP loss); resumes from the workdir",
              "Train a two-tower model (SigLIP or CLIP loss) with periodic evaluation; resumes "
              "automatically from the checkpoints in the workdir (with the same config: a "
              "resume with other settings is refused)."),
    "eval": ("evaluate a run's latest checkpoint, or a released model (configs/released.py)",
             "Evaluate the latest checkpoint of the run in --workdir with the run's own "
             "config.json (zero-shot, retrieval, RB, AB, gender accuracy). --config.<field> may "
             "change evaluation fields only (evals, eval_data, eval_batch_size, data_dir, mesh). "
             "Writes eval_step<N>.json beside the run's files, or in --output. With --config "
             "configs/released.py:source=...,path=... it evaluates a released big_vision .npz "
             "or Hugging Face folder with its own preprocessing on the prepared datasets named "
             "there and writes eval.json, eval_rows.json and summary.json/md to --workdir."),
    "report": ("plot and tabulate RB, AB and quality of the runs under the workdir",
               "Plot RB, AB and quality against examples seen for every run under the workdir "
               "(or the folders given with --runs) and tabulate their final metrics: writes "
               "report.png and report.md to the workdir."),
    "debias": ("CLIP-debias: pseudo groups from prompts, cluster re-sampling, baselines",
               "CLIP-debias: infer sensitive groups from a two-tower model's similarities to "
               "attribute prompts, cluster them, and train a target model with loss-aware "
               "cluster re-sampling, against ERM, JTT, GroupDRO and the true-group oracles over "
               "several seeds (analysis=methods: results.md/png), or vary prompts, k, F and tau "
               "(analysis=sensitivity: sensitivity.md/png)."),
    "results": ("collect a sweep's runs: table by factor, Wilcoxon tests, plots",
                "Collect every finished run of a sweep under the workdir (launch/local.py with "
                "configs/study.py) into one table by factor: mean ± std over seeds, paired "
                "Wilcoxon tests of each balanced cell against its baseline; writes results.csv, "
                "results.md and results.png to the workdir."),
    "config": ("print the resolved config (file, argument and overrides)",
               "Print the config that the other subcommands would use, after the config file's "
               "argument and every --config.<field>=<value> override; nothing is run or written."),
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
    summary, text = text
    p = sub.add_parser(name, help=summary, description=text,
                       epilog="Override any config field with --config.<dotted.key>=<value>.")
    default = ("the run's own config.json" if name == "eval" else _DEFAULT_CONFIG[name])
    p.add_argument("--config", default=None,
                   help=f"config file with optional argument, FILE.py[:ARG] (default {default}).")
    if name != "config":
      p.add_argument("--workdir", required=(name != "demo"),
                     default=("workdir/demo" if name == "demo" else None),
                     help=("the run to evaluate (with configs/released.py: the output "
                           "folder)." if name == "eval" else
                           "output folder; reruns resume from what is already there."))
    if name == "eval":
      p.add_argument("--output", default=None, metavar="DIR",
                     help="where eval_step<N>.json goes (default: the run's folder); use it to "
                          "evaluate a run you cannot write to.")
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


def _check_train_data(config, workdir, data) -> None:
  """Checks that need the data: eval datasets exist, evaluators find their splits, and
  balanced data versions are feasible (their M4 outputs are written here, as `balance`)."""
  from siglip_fair import study
  from siglip_fair.data import versions
  from siglip_fair.models.two_tower import make_model
  study.make_evaluators(config, data, make_model(config.model), bootstrap=False)
  for version, _ in versions.parse_schedule(config.data_version):
    if version != "baseline":
      study.balance(study.version_config(config, workdir, version), workdir, data, strict=True)


def _commands() -> dict[str, Callable]:
  from siglip_fair.config import checks

  def demo(config, workdir):
    from siglip_fair import demo as demo_lib
    checks.check_balance(config)
    checks.check_train(config)
    with _workdir(workdir, "demo"):
      demo_lib.run(config, workdir)

  def data(config, workdir):
    from siglip_fair import study
    checks.check_data(config)
    with _workdir(workdir, "data"):
      study.prepare_data(config, workdir, report=True)

  def balance(config, workdir):
    from siglip_fair import study
    checks.check_data(config)
    checks.check_balance(config)
    with _workdir(workdir, "balance"):
      study.balance(config, workdir, strict=True)

  def train(config, workdir):
    from siglip_fair import study
    checks.check_train(config)
    with _workdir(workdir, "train"):
      data = study.prepare_data_in_turn(config, workdir)
      _check_train_data(config, workdir, data)
      return study.train_and_evaluate(config, workdir, data=data)

  def evaluate(config, workdir, output=None):
    from siglip_fair import run_record
    from siglip_fair.train.progress import eval_summary_line
    if "released" in config:  # configs/released.py: a released model, no run of ours
      from siglip_fair import workdir as workdir_lib
      from siglip_fair.evaluate import released
      out = output or workdir
      workdir_lib.check_usable(out)
      result, path = released.evaluate(config, out)
      print(eval_summary_line(0, result).replace("eval @ step 0", "eval"))
      print(f"eval: released model {config.released.path}; wrote {path} and summary.md")
      return
    checks.check_data(config)
    if output:
      from siglip_fair import workdir as workdir_lib
      workdir_lib.check_usable(output)
    result, path = run_record.evaluate(workdir, config, output)
    print(eval_summary_line(result["step"], result))
    print(f"eval: step {result['step']} of {workdir}; wrote {path}")

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
      raise ConfigCheckError(f"analysis={config.analysis!r}; use one of {sorted(analyses)}.")
    from siglip_fair.debias.tasks import TASK_NAMES
    if config.task.name not in TASK_NAMES:
      raise ConfigCheckError(f"task.name={config.task.name!r} is not a debias task; use one of "
                             f"{TASK_NAMES} (e.g. --config configs/debias.py:task=digits).")
    with _workdir(workdir, "debias"):
      analyses[config.analysis](config, workdir)

  def results(config, workdir):
    del config
    from siglip_fair.report import sweep
    for path in sweep.write_results(workdir):
      print(f"results: wrote {path}")

  def show(config, workdir=None):
    del workdir
    print(config)

  return {"demo": demo, "data": data, "balance": balance, "train": train, "eval": evaluate,
          "report": report, "debias": debias, "results": results, "config": show}


class ConfigCheckError(ValueError):
  """A config value that names no known thing (exit status 2, like any config error)."""


@contextlib.contextmanager
def _workdir(path: str, command: str):
  """The workdir must be usable, and one command writes it at a time (process 0 of a
  multi-process job holds the lock for all)."""
  import jax
  from siglip_fair import workdir as workdir_lib
  workdir_lib.check_usable(path)
  with workdir_lib.lock(path, " ".join(["siglip-fair", command, *sys.argv[2:]]),
                        lead=jax.process_index() == 0):
    yield


def main(argv: Sequence[str] | None = None) -> int:
  from siglip_fair import workdir as workdir_lib
  from siglip_fair.config.loading import ConfigError, split_override_args
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    overrides, rest = split_override_args(argv)
  except ConfigError as e:
    print(f"siglip-fair: error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)
  try:
    given = _resolve_config(args, ()) if args.command == "eval" and args.config else None
    if given is not None and "released" in given:  # configs/released.py: no run to read
      config = _resolve_config(args, overrides)
    elif args.command == "eval":
      from siglip_fair import run_record
      from siglip_fair.train import checkpoint
      if checkpoint.latest_step(args.workdir) is None:
        print(f"siglip-fair eval: error: no complete checkpoint in {args.workdir!r}; train a "
              "model there first (siglip-fair train --workdir ...).", file=sys.stderr)
        return 1
      config = run_record.eval_config(args.workdir, overrides, given)
    else:
      config = _resolve_config(args, overrides)
  except ConfigError as e:
    print(f"siglip-fair: config error: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:  # eval: the run's own config.json
    print(f"siglip-fair {args.command}: error: {e}", file=sys.stderr)
    return 2
  try:
    if args.distributed or args.coordinator is not None:
      from siglip_fair.train import distributed
      distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    extra = ({"runs": args.runs} if args.command == "report" else
             {"output": args.output} if args.command == "eval" else {})
    _commands()[args.command](config, getattr(args, "workdir", None), **extra)
  except (ConfigCheckError, workdir_lib.WorkdirError, workdir_lib.WorkdirBusy) as e:
    print(f"siglip-fair {args.command}: error: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:
    # Library errors carry a message naming the problem; a traceback adds nothing for users.
    print(f"siglip-fair {args.command}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    # Outside training (which saves a checkpoint on SIGINT itself): every file is written
    # atomically, so stopping here leaves whole files only.
    print(f"siglip-fair {args.command}: interrupted (Ctrl-C); every file written is whole, "
          "rerun the same command to continue", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
