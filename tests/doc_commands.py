"""Parsing the docs for tests/test_docs.py and the tests that run documented commands: the
commands of README.md, docs/*.md and the usage lines of configs/*.py and launch/*.py, the
`--config.<key>` and bare key mentions, and loading the configs they name.

`readme_commands()` returns the README's commands for tests that run them.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shlex
from pathlib import Path

import ml_collections

from siglip_fair import config as cfglib
from siglip_fair.config.loading import ConfigError, _lookup_parent, split_override_args


ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
DOCSTRING_FILES = tuple(sorted(str(p.relative_to(ROOT)) for pattern in ("configs/*.py",
                                                                         "launch/*.py")
                               for p in ROOT.glob(pattern)))
# The config a subcommand loads without --config (its --help says so; checked below).
DEFAULT_CONFIG = {
    "demo": "configs/demo.py", "data": "configs/demo.py", "balance": "configs/demo.py",
    "train": "configs/demo.py", "eval": "configs/demo.py", "report": "configs/demo.py",
    "debias": "configs/debias.py", "results": "configs/study.py",
}
SHIPPED = tuple(sorted(set(DEFAULT_CONFIG.values())))
SHELL_LANGS = ("bash", "sh", "shell", "console")

# Config fields the docs name as bare words in inline code (a bare word cannot be told from
# any other code by its shape, so they are listed): doc -> keys.
PROSE_KEYS = {
    "README.md": ("loss", "loss_impl", "loss_chunk", "sharding_rules", "data_version", "total",
                  "warmup", "log_every", "ckpt_every", "eval_every"),
}
# Fields the issue found documented but missing: they must be in every shipped training config.
ISSUE_KEYS = ("mesh.data", "mesh.fsdp", "peak_flops", "sharding_rules", "optim.end_lr_frac",
              "tensorboard", "loss_impl", "loss_chunk", "keep_ckpts", "nonfinite", "progress")
# Modules whose `config.get(name[, default])` reads the run's config ("") or one of its groups.
READ_SITES = {
    "siglip_fair/cli.py": "",
    "siglip_fair/study.py": "",
    "siglip_fair/config/checks.py": "",
    "siglip_fair/train/*.py": "",
    "siglip_fair/train/optim.py": "optim",
}

# Shipped values that differ from the code's fallback on purpose (SigLIP's settings);
# study.py's fallback for `progress` is that of library calls without a config field.
DELIBERATE = {"optim.wd", "optim.b2", "progress@siglip_fair/study.py"}


# ---------------------------------------------------------------- parsing the docs


@dataclasses.dataclass(frozen=True)
class Command:
  """One documented shell command (one part of an `a && b` chain)."""
  source: str             # 'README.md:23'
  block: str              # the whole logical line as documented (continuations joined)
  argv: tuple[str, ...]   # the command's words, shell quoting removed
  program: str            # 'siglip_fair', 'siglip_fair.data.imports', 'launch/local.py',
  #                         'benchmarks/m4_bench.py', 'pytest' or 'setup' (venv, activate, pip)
  args: tuple[str, ...]   # the words after the program
  inline: bool = False    # named in prose (inline code), where required flags may be left out

  @property
  def overrides(self) -> list[tuple[str, str]]:
    return split_override_args(self.args)[0]

  @property
  def rest(self) -> list[str]:
    """The arguments other than `--config.<key>` overrides."""
    return split_override_args(self.args)[1]

  @property
  def subcommand(self) -> str | None:
    return self.rest[0] if self.program == "siglip_fair" and self.rest else None

  @property
  def config(self) -> str | None:
    """The `--config FILE[:ARGS]` given, else the subcommand's default (siglip_fair only)."""
    rest = self.rest
    for i, word in enumerate(rest):
      if word == "--config" and i + 1 < len(rest):
        return rest[i + 1]
      if word.startswith("--config="):
        return word.split("=", 1)[1]
    if self.program == "siglip_fair":
      return DEFAULT_CONFIG.get(self.subcommand)
    return None


def _classify(argv: list[str]) -> tuple[str, list[str]]:
  head = argv[0]
  if head == "siglip-fair":
    return "siglip_fair", argv[1:]
  if head in (".", "source", "pip", "pip3"):
    return "setup", argv[1:]
  if head in ("python", "python3") and len(argv) > 1:
    if argv[1] == "-m" and len(argv) > 2:
      module = argv[2]
      if module in ("venv", "pip"):
        return "setup", argv[3:]
      return module, argv[3:]
    return argv[1], argv[2:]
  raise AssertionError(f"documented command of an unknown kind: {shlex.join(argv)!r}; "
                       "teach tests/test_docs.py how to check it.")


def _split_chain(line: str) -> list[list[str]]:
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = "#"
  parts, current = [], []
  for token in lexer:
    if token in ("&&", "||", ";", "|", "&"):
      parts.append(current)
      current = []
    else:
      current.append(token)
  return [p for p in parts + [current] if p]


def _commands_in(text: str, source: str, first_line: int, inline=False) -> list[Command]:
  """Commands of a shell snippet; `\\` continuations joined, comments dropped."""
  out, lines, i = [], text.split("\n"), 0
  while i < len(lines):
    start, logical = i, lines[i]
    while logical.rstrip().endswith("\\") and i + 1 < len(lines):
      i += 1
      logical = logical.rstrip()[:-1] + " " + lines[i].strip()
    i += 1
    logical = logical.strip()
    if not logical or logical.startswith("#"):
      continue
    for argv in _split_chain(logical):
      program, args = _classify(argv)
      out.append(Command(f"{source}:{first_line + start}", logical, tuple(argv), program,
                         tuple(args), inline))
  return out


def _read(path: str) -> str:
  return (ROOT / path).read_text(encoding="utf-8")


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")


@functools.lru_cache(maxsize=None)
def _markdown(path: str) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
  """([(language, body, first line)] of the fenced blocks, [(inline code, line)] outside them)."""
  text = _read(path)
  blocks = [(m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1)
            for m in FENCE.finditer(text)]
  prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  inline = [(" ".join(m.group(1).split()), prose.count("\n", 0, m.start()) + 1)
            for m in INLINE.finditer(prose)]
  return blocks, inline


def _is_inline_command(code: str) -> bool:
  return bool(re.match(r"(python3?|siglip-fair|pip3?)\s", code)) and "<" not in code


def commands_of(path: str) -> list[Command]:
  """The commands documented in one file: shell blocks and inline `python ...` code of a
  Markdown file, usage lines of a Python file's docstring."""
  if path.endswith(".md"):
    blocks, inline = _markdown(path)
    out = [c for lang, body, line in blocks if lang in SHELL_LANGS
           for c in _commands_in(body, path, line)]
    return out + [c for code, line in inline if _is_inline_command(code)
                  for c in _commands_in(code, path, line, inline=True)]
  # The docstring's source lines: in its value a `\` ending a line has joined the next one.
  text = _read(path)
  tree = ast.parse(text)
  if not ast.get_docstring(tree):
    return []
  first = tree.body[0].lineno
  lines = text.split("\n")[first - 1:tree.body[0].end_lineno]
  out, i = [], 0
  while i < len(lines):
    if re.match(r"\s*(python3?|siglip-fair)\s", lines[i]):
      start, snippet = i, lines[i]
      while snippet.rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
        snippet += "\n" + lines[i]
      out += _commands_in(snippet, path, first + start)
    i += 1
  return out


def readme_commands() -> list[Command]:
  """The README's documented commands in order (one `Command` per part of an `&&` chain;
  `Command.block` holds the chain as written)."""
  return commands_of("README.md")


def doc_commands() -> list[Command]:
  return [c for path in DOC_FILES + DOCSTRING_FILES for c in commands_of(path)]


def _words(code: str) -> list[str]:
  try:
    return shlex.split(code)
  except ValueError:  # prose with an apostrophe
    return code.split()


def override_mentions() -> list[tuple[str, list[tuple[str, str | None]]]]:
  """[(source, [(key, value or None)])]: `--config.<key>[=<value>]` outside commands (inline
  code, lines of fenced blocks that are not shell), one entry per code span or line (its
  overrides apply together)."""
  out = []
  for path in DOC_FILES:
    blocks, inline = _markdown(path)
    spans = [(code, line) for code, line in inline if not _is_inline_command(code)]
    # A block that is not shell may quote code in backticks of its own.
    spans += [(text.replace("`", " "), first + i) for lang, body, first in blocks
              if lang not in SHELL_LANGS for i, text in enumerate(body.split("\n"))]
    for code, line in spans:
      found = []
      for word in _words(code):
        if not word.startswith("--config."):
          continue
        key, sep, value = word[len("--config."):].partition("=")
        if "<" in key:
          continue  # a placeholder such as --config.<field>=<value>
        found.append((key, value if sep and "<" not in value else None))
      if found:
        out.append((f"{path}:{line}", found))
  return out


def _python_attribute(dotted: str) -> bool:
  """Whether `dotted` names code in the package (`study.balance`), not a config field."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    name = "siglip_fair." + ".".join(parts[:cut])
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
      found = False
    if found:
      obj = importlib.import_module(name)
      try:
        for attr in parts[cut:]:
          obj = getattr(obj, attr)
      except AttributeError:
        return False
      return True
  return False


def _unquote(value: str) -> str:
  if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
    return value[1:-1]
  return value


@functools.lru_cache(maxsize=None)
def _top_level_groups() -> frozenset[str]:
  return frozenset(k for path in SHIPPED for k, v in _load(path).items()
                   if isinstance(v, ml_collections.ConfigDict))


def prose_keys() -> list[tuple[str, str, str | None]]:
  """[(source, key, value or None)]: config fields named in inline code outside commands:
  `config.<key>` anywhere in a span; a span that is a dotted key of a config group, maybe
  with `=value` (`model.dtype='bfloat16'`, `cluster.k`); and `PROSE_KEYS`."""
  out = []
  for path in DOC_FILES:
    _, inline = _markdown(path)
    for code, line in inline:
      if _is_inline_command(code) or code.startswith("--"):
        continue
      source = f"{path}:{line}"
      for m in re.finditer(r"(?<![\w.\-])config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                           r"(?:\s*=\s*([^\s,;)]+))?", code):
        called = code[m.end(1):m.end(1) + 1] == "("  # config.get_config(...): code
        if not called and m.group(1).split(".")[-1] not in ("py", "json"):
          out.append((source, m.group(1), m.group(2)))
      m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\s*=\s*(\S+))?", code)
      if (m and not code.startswith("config.") and m.group(1).split(".")[0] in _top_level_groups()
          and not re.search(r"\.(py|json|jsonl|md|png)$", m.group(1))
          and not _python_attribute(m.group(1))):
        out.append((source, m.group(1), m.group(2)))
    out += [(path, key, None) for key in PROSE_KEYS.get(path, ())]
  return out


# ---------------------------------------------------------------- loading configs


def _load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`cfglib.get_config` with repository-relative paths, as the commands run from the root."""
  path, sep, arg = spec.partition(":")
  if not os.path.isabs(path):
    path = str(ROOT / path)
  return cfglib.get_config(path + sep + arg, overrides)


def _resolves_somewhere(pairs: list[tuple[str, str | None]]) -> list[str]:
  """Errors per shipped config; empty when some shipped config takes every pair."""
  errors = []
  for spec in SHIPPED:
    config = _load(spec)
    try:
      for key, value in pairs:
        if value is None:
          _lookup_parent(config, key)
        else:
          cfglib.apply_overrides(config, [(key, _unquote(value))])
      return []
    except ConfigError as e:
      errors.append(f"{spec}: {e}")
  return errors


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location(
      "docs_" + path.replace("/", "_").removesuffix(".py"), ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
