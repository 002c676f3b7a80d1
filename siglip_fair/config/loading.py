"""Config files and command-line overrides.

A config file is trusted Python code (like big_vision's and the Flax examples'): it defines
``get_config(arg=None) -> ml_collections.ConfigDict`` and may define ``sweep(add)``.
On the command line:

    --config configs/demo.py:steps=300,loss=softmax   # file plus the string passed to get_config
    --config.batch_size=64 --config.model.embed_dim 128   # overrides, type-checked
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

from siglip_fair.config import durations

# The repository root that holds the shipped configs/ (an editable install or a checkout).
_SHIPPED_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Leaf names of duration fields (optim's schedule durations included).
_DURATION_KEYS = {"total", *durations.DURATION_FIELDS, "rewarmup", "cooldown", "timescale"}
# Groups whose members the user names (one entry per real eval dataset): an override may add a
# member, e.g. `--config.eval_data.ff.dataset=fairface`; its fields are checked where they are
# read (study.eval_sources).
OPEN_GROUPS = ("eval_data",)


class ConfigError(ValueError):
  """A config file, argument or override that cannot be used; the message says why."""


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses a `get_config` argument string such as ``"steps=300,loss=softmax,fast"``.

  Each key of `spec` gives a default; values on the command line are converted to the type of
  that default. A bare key sets a boolean flag to True. Unknown keys are an error unless
  ``lazy=True`` (then they are kept as literals or strings).
  """
  result = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return result
  for item in filter(None, (x.strip() for x in arg.split(","))):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in spec and not lazy:
      raise ConfigError(f"unknown config argument {key!r}; known: {', '.join(sorted(spec)) or 'none'}"
                        f"{_suggest(key, spec)}.")
    if not sep:
      default = spec.get(key, False)
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...).")
      result[key] = True
      continue
    result[key] = _convert(raw.strip(), spec.get(key), f"config argument {key!r}")
  return result


def load_config_file(spec: str) -> tuple[ml_collections.ConfigDict, Any]:
  """Loads ``path.py[:arg]`` and returns ``(get_config(arg), module)``."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"--config must name a .py file (optionally ':args'), got {spec!r}.")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass an existing FILE.py[:ARGS] "
                      "(e.g. configs/siglip.py) or leave --config out for the default.")
  name = "siglip_fair_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  # Variants import their base as `from configs import siglip`: make the folder that holds the
  # config's package importable while the file runs, and the shipped configs' folder too, so a
  # personal config anywhere can build on them from every entry point (`siglip-fair`, `python
  # -m siglip_fair`, launch/local.py), whatever the current directory.
  roots = [os.path.dirname(os.path.dirname(os.path.abspath(path)))]
  if os.path.isdir(os.path.join(_SHIPPED_ROOT, "configs")):
    roots.append(_SHIPPED_ROOT)
  sys.path[:0] = roots
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} line {e.lineno}: syntax error ({e.msg}); fix the "
                      "file so that `python " + path + "` runs.") from None
  except Exception as e:  # pylint: disable=broad-except  # user code: report, don't trace
    raise ConfigError(f"config file {path!r} failed to load{_where(e, path)}: "
                      f"{type(e).__name__}: {e}") from None
  finally:
    for root in roots:
      sys.path.remove(root)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg); add `def "
                      "get_config(arg=None)` returning an ml_collections.ConfigDict (see "
                      "configs/siglip.py).")
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{path}: get_config({arg or ''!r}) failed{_where(e, path)}: "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}.")
  return config, module


def _where(error: BaseException, path: str) -> str:
  """' at line N' of the innermost frame of `error` inside the config file (if any)."""
  import traceback  # pylint: disable=g-import-not-at-top
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" at line {lines[-1]}" if lines else ""


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Applies ``(dotted.key, raw value)`` overrides in order; unknown keys and bad types fail."""
  for dotted, raw in overrides:
    parent, leaf = _lookup_parent(config, dotted)
    current = parent[leaf]
    if leaf in _DURATION_KEYS and isinstance(current, (int, str)):
      # Durations take steps or unit strings ('5000ex', '2ep', '10%'); checked in durations.py.
      try:
        durations.check_override(leaf, raw, name=f"--config.{dotted}")
      except ValueError as e:  # a ConfigError, so the CLI reports it like any bad override
        raise ConfigError(str(e)) from None
      try:
        parent[leaf] = raw
      except TypeError:  # a field that held steps (int) now takes a unit string
        del parent[leaf]
        parent[leaf] = raw
      continue
    parent[leaf] = _convert(raw, current, f"--config.{dotted}")
  return config


def split_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Pulls ``--config.a.b=v`` / ``--config.a.b v`` out of argv; returns (overrides, rest)."""
  overrides, rest, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    tok = argv[i]
    if tok.startswith("--config."):
      key, sep, value = tok[len("--config."):].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise ConfigError(f"{tok} needs a value.")
        value, i = argv[i + 1], i + 1
      if not key:
        raise ConfigError(f"malformed override {tok!r}.")
      overrides.append((key, value))
    else:
      rest.append(tok)
    i += 1
  return overrides, rest


def get_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The whole command-line path: load ``file.py:arg`` then apply overrides."""
  config, _ = load_config_file(spec)
  return apply_overrides(config, overrides)


def _lookup_parent(config, dotted: str):
  node, parts = config, dotted.split(".")
  for depth, part in enumerate(parts):
    keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
    if part not in keys and depth == 1 and parts[0] in OPEN_GROUPS and len(parts) == 3:
      node[part] = ml_collections.ConfigDict()  # a new member: eval_data.<name>.<field>
      keys.append(part)
    if (part not in keys and depth == 2 and parts[0] in OPEN_GROUPS
        and isinstance(node, ml_collections.ConfigDict)):
      node[part] = None  # a member's field; None takes the value as a literal or a string
      keys.append(part)
    if part not in keys:
      where = ".".join(parts[:depth]) or "config"
      hint = _suggest(part, keys) or (f"; its fields are {', '.join(sorted(keys))}" if keys
                                      else "")
      raise ConfigError(f"unknown config key {dotted!r}: {where} has no field {part!r}{hint}.")
    if depth == len(parts) - 1:
      return node, part
    node = node[part]
  raise AssertionError("unreachable")


def _convert(raw: str, current: Any, what: str):
  """Converts a command-line string to the type of the value it replaces."""
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"{what} expects a boolean (true/false), got {raw!r}.")
  if isinstance(current, str):
    return raw
  if isinstance(current, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"{what} is a group of fields; set its members, e.g. {what}.<field>=...")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw  # Unset fields (None) take strings as given.
    raise ConfigError(f"{what} expects {type(current).__name__} (like its current value "
                      f"{current!r}), got {raw!r}.") from None
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(current)(value)
  if isinstance(value, bool) or not isinstance(value, type(current)):
    raise ConfigError(f"{what} expects {type(current).__name__} (like its current value "
                      f"{current!r}), got {raw!r} ({type(value).__name__}).")
  return value


def _suggest(key: str, keys) -> str:
  close = difflib.get_close_matches(key, list(keys), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""
