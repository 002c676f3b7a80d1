"""Every documented command and config key works (issue 16, item 4).

The docs (README.md, docs/*.md) and the usage lines in the docstrings of configs/*.py and
launch/*.py are parsed here:

* every shell command of a ```bash block (and every inline `python ...` command): its program
  and subcommand exist, its flags parse, its `--config FILE[:ARGS]` loads with its
  `--config.<key>=<value>` overrides applied, and `--help` exits 0;
* every `--config.<key>[=<value>]` mention outside a command, every `config.<key>`, every
  inline dotted key of a config group (`model.dtype='bfloat16'`, `cluster.k`) and the bare keys
  of `PROSE_KEYS` resolve in a shipped config (with the value applied where one is given);
* every field the training code reads with `config.get(name, default)` is in the shipped
  config, with the code's default unless the config deliberately chooses another.

The parsing lives in doc_commands.py.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import subprocess
import sys

import pytest

from siglip_fair import cli
from siglip_fair import config as cfglib
from siglip_fair.config.loading import ConfigError, _lookup_parent, split_override_args


from doc_commands import (
    DEFAULT_CONFIG,
    DELIBERATE,
    DOC_FILES,
    ISSUE_KEYS,
    PROSE_KEYS,
    READ_SITES,
    ROOT,
    _classify,
    _is_inline_command,
    _load,
    _load_module,
    _markdown,
    _read,
    _resolves_somewhere,
    doc_commands,
    override_mentions,
    prose_keys,
    readme_commands,
)


# ---------------------------------------------------------------- the tests


def test_the_docs_are_parsed():
  """The parsers find what the docs hold (an extractor that finds nothing checks nothing)."""
  readme = readme_commands()
  subs = {c.subcommand for c in readme if c.program == "siglip_fair"}
  assert {"demo", "train", "debias", "results"} <= subs
  assert {"launch/local.py", "launch/tpu.py", "siglip_fair.data.imports", "pytest",
          "setup"} <= {c.program for c in readme}
  quick = [c for c in readme if c.subcommand == "demo"][0]
  assert quick.block.startswith("python3 -m venv .venv && . .venv/bin/activate")
  assert quick.argv == ("python", "-m", "siglip_fair", "demo", "--workdir", "workdir/demo")
  train = [c for c in readme if c.subcommand == "train"][0]
  assert train.config.startswith("configs/siglip.py:variant=Ti/8,") and "steps=3000" in train.config
  assert train.overrides == [("batch_size", "256"), ("optim.lr", "1e-3")]
  mentioned = {k for _, pairs in override_mentions() for k, _ in pairs}
  assert {"mesh.data", "mesh.fsdp", "peak_flops", "eval_data.ff.dataset",
          "balance.allow_infeasible"} <= mentioned
  named = {k for _, k, _ in prose_keys()}
  assert {"nonfinite", "model.dtype", "cluster.k", "sharding_rules", "optim.end_lr_frac",
          "balance.optim.blocks"} <= named
  assert "study.balance" not in named  # a function, not a field
  docstrings = {c.source.split(":")[0] for c in doc_commands()}
  assert {"configs/study.py", "configs/debias.py", "launch/local.py",
          "launch/tpu.py"} <= docstrings


@pytest.mark.parametrize("command", [c for c in doc_commands() if c.program == "siglip_fair"],
                         ids=lambda c: c.source)
def test_cli_command_parses_and_its_config_loads(command):
  assert command.subcommand in DEFAULT_CONFIG, (
      f"{command.source}: no subcommand {command.subcommand!r} in {command.block!r}")
  rest = command.rest
  if command.inline and "--workdir" not in rest:
    rest += ["--workdir", "w"]  # prose names a subcommand without its output folder
  try:
    cli._parser().parse_args(rest)  # pylint: disable=protected-access
  except SystemExit as e:
    raise AssertionError(f"{command.source}: {command.block!r} does not parse") from e
  _load(command.config, command.overrides)  # unknown keys and wrong types raise


def _sweep_configs(path: str, base_arg: str, sweep: str, overrides) -> int:
  local = _load_module("launch/local.py")
  _, module = cfglib.load_config_file(str(ROOT / path))
  runs = local.run_names(module, base_arg, sweep)
  for _, arg in runs:
    _load(f"{path}:{arg}", overrides)
  return len(runs)


@pytest.mark.parametrize("command", [c for c in doc_commands()
                                     if c.program == "launch/local.py"],
                         ids=lambda c: c.source)
def test_local_launcher_command(command):
  help_text = _help(("launch/local.py",))
  flags = [w.split("=")[0] for w in command.rest if w.startswith("--")]
  assert all(f in help_text for f in flags), (command.source, flags)
  rest = command.rest
  spec = rest[rest.index("--config") + 1]
  sweep = rest[rest.index("--sweep") + 1] if "--sweep" in rest else "sweep"
  path, _, base_arg = spec.partition(":")
  assert _sweep_configs(path, base_arg, sweep, command.overrides) > 0


@pytest.mark.parametrize("command", [c for c in doc_commands() if c.program == "launch/tpu.py"],
                         ids=lambda c: c.source)
def test_tpu_launcher_command(command):
  tpu = _load_module("launch/tpu.py")
  try:
    args = tpu._parser().parse_args(command.rest)  # pylint: disable=protected-access
  except SystemExit as e:
    raise AssertionError(f"{command.source}: {command.block!r} does not parse") from e
  assert args.workdir, f"{command.source}: tpu.py needs --workdir"
  path, _, base_arg = args.config.partition(":")
  if args.sweep:
    assert _sweep_configs(path, base_arg, args.sweep, command.overrides) > 0
  else:
    _load(args.config, command.overrides)
  # What every host runs is itself a documented-style command: it must parse too.
  job = tpu.job_argv(args, [f"--config.{k}={v}" for k, v in command.overrides])
  if not args.sweep:
    program, job_args = _classify(job)
    assert program == "siglip_fair"
    overrides, rest = split_override_args(job_args)
    cli._parser().parse_args(rest)  # pylint: disable=protected-access
    assert (rest[0], overrides) == (args.command, command.overrides)


@pytest.mark.parametrize("command", [c for c in doc_commands()
                                     if c.program == "siglip_fair.data.imports"],
                         ids=lambda c: c.source)
def test_import_command(command):
  from siglip_fair.data import imports
  assert command.args[0] in imports.KINDS, command.source
  help_text = _help(("-m", "siglip_fair.data.imports"))
  flags = [w.split("=")[0] for w in command.args if w.startswith("--")]
  assert all(f in help_text for f in flags), (command.source, flags)


def test_other_commands_name_what_exists():
  """Scripts exist, `-m` modules import, and pip extras are declared in pyproject.toml."""
  pyproject = _read("pyproject.toml")
  for command in doc_commands():
    if command.program in ("siglip_fair", "launch/local.py", "launch/tpu.py",
                           "siglip_fair.data.imports"):
      continue
    if command.program == "setup":
      for extra in re.findall(r"\.\[(\w+)\]", " ".join(command.args)):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), (command.source, extra)
    elif command.program == "pytest":
      assert "pytest" in pyproject
    elif command.program.endswith(".py"):
      assert (ROOT / command.program).is_file(), command.source
    else:
      assert importlib.util.find_spec(command.program), (command.source, command.program)


@functools.lru_cache(maxsize=None)
def _help(prefix: tuple[str, ...]) -> str:
  # The timeout only guards against a hang.
  result = subprocess.run([sys.executable, *prefix, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, (prefix, result.stderr[-2000:])
  return result.stdout


@pytest.mark.parametrize("sub", sorted({c.subcommand for c in doc_commands()
                                        if c.program == "siglip_fair"}))
def test_documented_subcommand_help_exits_zero(sub):
  # The help names the default config, which the checks above load for commands without one
  # (`eval`'s is the run's own config.json, a training config: they load configs/demo.py).
  default = "the run's own config.json" if sub == "eval" else DEFAULT_CONFIG[sub]
  assert f"(default {default})" in " ".join(_help(("-m", "siglip_fair", sub)).split())


@pytest.mark.parametrize("source, pairs", override_mentions(), ids=lambda x: str(x)[:60])
def test_override_mentions_resolve(source, pairs):
  errors = _resolves_somewhere(pairs)
  assert not errors, f"{source}: {pairs} fit no shipped config:\n" + "\n".join(errors)


def test_prose_keys_are_still_named_in_the_docs():
  for path, keys in PROSE_KEYS.items():
    spans = {code for code, _ in _markdown(path)[1]}
    missing = [k for k in keys if k not in spans]
    assert not missing, f"{path} no longer names {missing} in inline code; update PROSE_KEYS"


@pytest.mark.parametrize("source, key, value", prose_keys(), ids=lambda x: str(x)[:60])
def test_prose_keys_resolve(source, key, value):
  errors = _resolves_somewhere([(key, value)])
  assert not errors, f"{source}: `{key}` is in no shipped config:\n" + "\n".join(errors)


def test_inline_config_files_load():
  """`--config FILE.py[:ARGS]` written in prose (not as a whole command) loads."""
  found = 0
  for path in DOC_FILES:
    for code, line in _markdown(path)[1]:
      if not _is_inline_command(code):
        for spec in re.findall(r"--config[ =](\S+\.py\S*)", code):
          if spec.startswith("FILE.py"):
            continue  # the placeholder of FILE.py[:ARGS]
          found += 1
          _load(spec)
  assert found  # README: `train` ... (`--config configs/demo.py:data=balanced`)


def test_python_blocks_load_their_configs():
  specs = [spec for path in DOC_FILES for lang, body, _ in _markdown(path)[0] if lang == "python"
           for spec in re.findall(r"get_config\(\"([^\"]+)\"\)", body)]
  assert specs  # README, library use: config.get_config("configs/siglip.py:steps=300")
  for spec in specs:
    _load(spec)


@pytest.mark.parametrize("spec", ["configs/siglip.py", "configs/demo.py", "configs/study.py",
                                  "configs/study.py:scale=gpu", "configs/debias.py"])
def test_issue_keys_exist_in_every_training_config(spec):
  config = _load(spec)
  if "clip" in config:
    config = config.clip.config  # debias trains its two-tower model from this one
  for key in ISSUE_KEYS:
    _lookup_parent(config, key)


def _read_site_files() -> dict[str, str]:
  """path -> group, for the modules of `READ_SITES` that exist (an exact path wins a glob)."""
  out = {}
  for pattern, group in READ_SITES.items():
    for p in sorted(ROOT.glob(pattern)):
      path = str(p.relative_to(ROOT))
      if path not in out or pattern == path:
        out[path] = group
  return out


def _read_sites(path: str) -> list[tuple[str, object, bool]]:
  """[(field, default, has_default)] of `config.get("field"[, default])` calls in `path`."""
  def module():  # imported only for a default given as a name (DEFAULT_RULES)
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))

  out = []
  for node in ast.walk(ast.parse(_read(path))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get" and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "config" and node.args
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      if len(node.args) < 2:
        out.append((node.args[0].value, None, False))
        continue
      default = node.args[1]
      value = (getattr(module(), default.id) if isinstance(default, ast.Name)
               else ast.literal_eval(default))
      out.append((node.args[0].value, value, True))
  return out


def _plain(value):
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def test_fields_the_code_reads_are_in_the_shipped_config():
  config = _load("configs/siglip.py")
  read = set()
  for path, group in _read_site_files().items():
    for name, default, has_default in _read_sites(path):
      read.add(f"{group}.{name}" if group else name)
      _check_read_site(config, path, group, name, default, has_default)
  # The parser finds the reads (loop.py's and optim.py's at least).
  assert {"sharding_rules", "peak_flops", "tensorboard", "optim.end_lr_frac"} <= read


def _check_read_site(config, path, group, name, default, has_default):
  key = f"{group}.{name}" if group else name
  try:
    parent, leaf = _lookup_parent(config, key)
  except ConfigError as e:
    raise AssertionError(f"{path} reads config.{key}, which configs/siglip.py lacks, so "
                         f"--config.{key}=... is refused: {e}") from None
  if has_default and key not in DELIBERATE and f"{key}@{path}" not in DELIBERATE:
    assert _plain(parent[leaf]) == _plain(default), (
        f"{path} falls back to {key}={default!r}, configs/siglip.py ships {parent[leaf]!r}")


def test_new_fields_keep_the_behaviour_of_their_absence():
  import jax
  from siglip_fair.train import flops, sharding
  config = _load("configs/siglip.py")

  class Device:  # a device of a kind with a vendor peak
    device_kind = "TPU v4"

  assert flops.peak_flops(Device(), config.peak_flops) == flops.peak_flops(Device(), None)
  assert flops.peak_flops(Device(), config.peak_flops) == flops.PEAK_FLOPS["tpu v4"]
  assert _load("configs/siglip.py", [("peak_flops", "1e15")]).peak_flops == 1e15

  # The shipped mesh and rules place the batch and the state as the code's fallbacks do:
  # rows over every device, parameters replicated.
  shipped, fallback = sharding.make_mesh(config.mesh), sharding.make_mesh(None)
  batch_devices = lambda mesh: sharding.batch_sharding(mesh).num_devices  # noqa: E731
  assert batch_devices(shipped) == batch_devices(fallback) == len(jax.devices())
  tree = {"kernel": jax.ShapeDtypeStruct((64, 32), "float32")}
  for mesh, rules in ((shipped, config.sharding_rules), (fallback, sharding.DEFAULT_RULES)):
    assert sharding.state_shardings(tree, mesh, rules)["kernel"].is_fully_replicated
  assert _plain(config.sharding_rules) == _plain(sharding.DEFAULT_RULES)
  rules = _load("configs/siglip.py",
                [("sharding_rules", "(('.*/embedding', 'replicate'), ('.*', 'fsdp'))")])
  assert rules.sharding_rules[0] == (".*/embedding", "replicate")

  # The README's --config.mesh.data=2 --config.mesh.fsdp=4, on 8 devices.
  if len(jax.devices()) == 8:
    mesh_cfg = _load("configs/siglip.py", [("mesh.data", "2"), ("mesh.fsdp", "4")]).mesh
    mesh = sharding.make_mesh(mesh_cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sharding.state_shardings(tree, mesh, config.sharding_rules)["kernel"].spec == (
        jax.sharding.PartitionSpec("fsdp"))
