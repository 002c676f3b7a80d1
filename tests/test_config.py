"""Config files, `file.py:arg` parsing, overrides and durations."""
import textwrap

import ml_collections
import pytest

from siglip_fair import config as cfglib


def _write_config(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      from siglip_fair.config import parse_arg

      def get_config(arg=None):
        arg = parse_arg(arg, steps=100, loss="sigmoid", fast=False)
        c = ml_collections.ConfigDict()
        c.total = str(arg.steps)
        c.loss = arg.loss
        c.batch_size = 32 if arg.fast else 64
        c.model = ml_collections.ConfigDict({"width": 32, "variant": "mu/4"})
        c.lr = 1e-3
        return c

      def sweep(add):
        for loss in ("sigmoid", "softmax"):
          add(loss=loss)
      """))
  return str(path)


def test_file_arg_and_overrides(tmp_path):
  path = _write_config(tmp_path)
  config = cfglib.get_config(f"{path}:steps=300,loss=softmax,fast",
                             [("model.width", "64"), ("lr", "1"), ("total", "2ep")])
  assert config.total == "2ep"  # the override wins over the arg
  assert config.loss == "softmax" and config.batch_size == 32
  assert config.model.width == 64 and isinstance(config.lr, float) and config.lr == 1.0


def test_sweep_function_is_loaded(tmp_path):
  _, module = cfglib.load_config_file(_write_config(tmp_path))
  runs = []
  module.sweep(lambda **kw: runs.append(kw))
  assert runs == [{"loss": "sigmoid"}, {"loss": "softmax"}]


@pytest.mark.parametrize("override, message", [
    (("model.widht", "3"), "did you mean 'width'"),
    (("nope", "3"), "no field 'nope'"),
    (("model.width", "abc"), "expects int"),
    (("lr", "'x'"), "expects float"),
    (("model", "3"), "group of fields"),
    (("total", "3 apples"), "cannot read duration"),
])
def test_bad_overrides_name_the_problem(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    cfglib.get_config(_write_config(tmp_path), [override])


def test_bad_arg_and_file(tmp_path):
  with pytest.raises(cfglib.ConfigError, match="unknown config argument 'step'.*'steps'"):
    cfglib.get_config(_write_config(tmp_path) + ":step=3")
  with pytest.raises(cfglib.ConfigError, match="does not exist"):
    cfglib.get_config(str(tmp_path / "missing.py"))


def test_split_override_args():
  overrides, rest = cfglib.split_override_args(
      ["--workdir", "w", "--config.a.b=1", "--config.c", "x", "--other"])
  assert overrides == [("a.b", "1"), ("c", "x")]
  assert rest == ["--workdir", "w", "--other"]


@pytest.mark.parametrize("value, expected", [
    (300, 300), ("300", 300), ("6400ex", 100), ("6401ex", 101), ("2ep", 200), ("10%", 50),
    ("0.5ep", 50), ("0", 0)])
def test_to_steps_units(value, expected):
  assert cfglib.to_steps(value, batch_size=64, total_steps=500, num_examples=6400) == expected


def test_resolve_steps_and_errors():
  c = ml_collections.ConfigDict(dict(batch_size=64, total="2ep", warmup="10%", log_every=7))
  steps = cfglib.resolve_steps(c, num_examples=6400)
  assert (steps.total_steps, steps.warmup_steps, steps.log_every) == (200, 20, 7)
  assert steps.ckpt_every == 50 and steps.eval_every == 100
  with pytest.raises(ValueError, match="percentage"):
    cfglib.resolve_steps(ml_collections.ConfigDict(dict(batch_size=8, total="10%")))
  with pytest.raises(ValueError, match="epochs but the training-set size"):
    cfglib.resolve_steps(ml_collections.ConfigDict(dict(batch_size=8, total="1ep")))
  with pytest.raises(ValueError, match="batch_size"):
    cfglib.resolve_steps(ml_collections.ConfigDict(dict(batch_size=0, total=10)))


@pytest.mark.parametrize("value", [0, "0", "never", " Never ", "0%", "0ex"])
def test_eval_every_zero_or_never_resolves_to_zero_meaning_off(value):
  c = ml_collections.ConfigDict(dict(batch_size=8, total=100, eval_every=value, log_every=0))
  steps = cfglib.resolve_steps(c)
  assert steps.eval_every == 0  # the loop never evaluates (test_loop_hygiene.py)
  assert steps.log_every == 1  # other intervals stay at least one step
  c.ckpt_every = 0
  assert cfglib.resolve_steps(c).ckpt_every == 0  # only the final checkpoint


def test_check_override_accepts_never_for_eval_every_only():
  from siglip_fair.config import durations
  for raw in ("never", "NEVER", "0", "10%", "2ep", "5000ex", "300"):
    durations.check_override("eval_every", raw, name="--config.eval_every")
  durations.check_override("ckpt_every", "0")
  with pytest.raises(ValueError, match=r"--config.log_every: 'never' is only for eval_every"):
    durations.check_override("log_every", "never", name="--config.log_every")
  with pytest.raises(ValueError, match=r"^eval_every: cannot read duration '3 apples'"):
    durations.check_override("eval_every", "3 apples")
  with pytest.raises(ValueError, match="percentage"):  # the length itself is no percentage
    durations.check_override("total", "10%")
  durations.check_override("total", "2ep")
  # In a config file, too, 'never' is for eval_every only.
  for field in ("log_every", "ckpt_every", "warmup", "total"):
    c = ml_collections.ConfigDict({"batch_size": 8, "total": 100, field: "never"})
    with pytest.raises(ValueError, match="cannot read duration 'never'"):
      cfglib.resolve_steps(c)
