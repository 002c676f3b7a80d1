"""Command line: ``python -m siglip_fair <subcommand> --config file.py[:arg] --workdir DIR``.

Every subcommand takes a config file (``get_config(arg)``), ``--config.key=value`` overrides and
a work directory. The heavy imports happen inside the subcommands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
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
                "(JSON, Markdown, PNG) to <workdir>/balance."),
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


def _commands() -> dict[str, Callable]:
  def demo(config, workdir):
    from siglip_fair import demo as demo_lib
    demo_lib.run(config, workdir)

  def data(config, workdir):
    from siglip_fair import study
    study.prepare_data(config, workdir, report=True)

  def balance(config, workdir):
    from siglip_fair import study
    study.balance(config, workdir)

  def train(config, workdir):
    from siglip_fair import study
    study.train_and_evaluate(config, workdir)

  def evaluate(config, workdir):
    from siglip_fair import study
    study.evaluate_checkpoint(config, workdir)

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
