"""Run hygiene of the training loop: the start line and `on_start`, periodic evaluation switched
off (eval_every 0 / 'never'), evaluation summary lines, final-only checkpoints (ckpt_every 0),
and out-of-memory errors that name the knobs."""
import os
import re

import jax
import pytest

from siglip_fair.models import make_model
from siglip_fair.train import checkpoint, loop
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.progress import eval_summary_line, read_metrics
from siglip_fair.train.state import make_init_fn
from test_train import _config, _train_iter

TOTAL = 4


def _small(**overrides):
  # The same model and length in every test here: one compilation, then cache loads.
  return _config(total=TOTAL, warmup=1, log_every=1, ckpt_every=2, batch_size=8,
                 **overrides)


def _training_lines(text):
  return [line for line in text.splitlines() if line.startswith("training: ")]


def test_start_line_and_on_start_for_fresh_resumed_and_finished_runs(tmp_path, capsys):
  workdir = str(tmp_path)
  config = _small(eval_every="never")
  calls, evaluated = [], []

  def on_start(start, total):
    # Restored or initialised, nothing trained yet in this call: the latest checkpoint is
    # the start (none for a fresh run).
    calls.append((start, total, checkpoint.latest_step(workdir)))

  def evaluate(params, step):
    evaluated.append(step)
    return {"zeroshot/top1": 0.5}

  expected = [(2, (0, TOTAL, None), f"training: fresh run, 0 of {TOTAL} steps"),
              (None, (2, TOTAL, 2), f"training: resumed from step 2 of {TOTAL}"),
              (None, (TOTAL, TOTAL, TOTAL),
               f"training: already finished (step {TOTAL} of {TOTAL})")]
  for stop_after, call, line in expected:
    calls.clear()
    state = loop.train(config, workdir, train_iter=_train_iter(8), evaluate_fn=evaluate,
                       stop_after=stop_after, on_start=on_start)
    assert calls == [call]  # once per run, with (start step, total steps)
    assert _training_lines(capsys.readouterr().out) == [line]  # exactly one line
    assert int(state.step) == (stop_after or TOTAL)
  assert evaluated == []  # eval_every='never': not even at the last step


def test_a_rejected_resume_never_reaches_on_start(tmp_path, capsys):
  # A checkpoint of another model size (embed_dim 16, not 32) in the workdir.
  other = _small()
  other.model.embed_dim = 16
  model = make_model(other.model)
  tx, _ = make_optimizer(other.optim, TOTAL, 1)
  batch = next(_train_iter(8))
  init = make_init_fn(model, tx, batch["image"], batch["text"])
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, jax.jit(init)(jax.random.key_data(jax.random.key(0))))
  manager.wait_until_finished()
  manager.close()
  calls = []
  with pytest.raises(checkpoint.CheckpointError, match="the config builds"):
    loop.train(_small(), str(tmp_path), train_iter=_train_iter(8),
               on_start=lambda *a: calls.append(a))
  with pytest.raises(ValueError, match="keep_ckpts"):
    loop.train(_small(keep_ckpts=0), str(tmp_path / "fresh"), train_iter=_train_iter(8),
               on_start=lambda *a: calls.append(a))
  assert calls == []
  assert _training_lines(capsys.readouterr().out) == []


def test_eval_every_zero_never_evaluates_and_ckpt_every_zero_saves_only_the_end(tmp_path):
  evaluated = []
  config = _small(eval_every=0)
  config.ckpt_every = 0
  loop.train(config, str(tmp_path), train_iter=_train_iter(8),
             evaluate_fn=lambda params, step: evaluated.append(step) or {})
  assert evaluated == []
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(TOTAL)]
  assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]


def test_each_periodic_evaluation_prints_a_summary_line(tmp_path, capsys):
  def evaluate(params, step):
    return {"zeroshot/top1": 0.5123 + step, "extra": 7.0, "bias/rb": -12.34}

  loop.train(_small(eval_every=2), str(tmp_path), train_iter=_train_iter(8),
             evaluate_fn=evaluate)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("eval @")]
  assert lines == ["eval @ step 2: zeroshot/top1 2.51, bias/rb -12.3",
                   "eval @ step 4: zeroshot/top1 4.51, bias/rb -12.3"]
  # The full results still go to metrics.jsonl.
  records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "extra" in r]
  assert [(r["step"], r["extra"]) for r in records] == [(2, 7.0), (4, 7.0)]


def test_eval_summary_line_picks_headline_metrics():
  metrics = {"zeroshot/top5": 0.9, "retrieval/t2i_r1": 0.1, "bias/ab_mean": 20.14,
             "retrieval/i2t_r1": 0.10449, "zeroshot/top1": 0.5124, "bias/rb": -12.34,
             "zeroshot/top1_lo": 0.4}
  assert eval_summary_line(300, metrics) == (
      "eval @ step 300: zeroshot/top1 0.512, retrieval/i2t_r1 0.104, retrieval/t2i_r1 0.1, "
      "bias/rb -12.3, bias/ab_mean 20.1")
  # No headline metric: the first few numeric ones, without bootstrap bounds or text.
  other = {"ff/acc_lo": 0.1, "ff/acc": 0.25, "name": "baseline", "a": 1, "b": 2.0,
           "vector": [1.0, 2.0], "c": float("nan"), "d": 4.0}
  assert eval_summary_line(5, other) == "eval @ step 5: ff/acc 0.25, a 1, b 2, c nan"
  assert eval_summary_line(5, {}) == "eval @ step 5: no metrics"


class _FakeStep:
  """Stands in for the jitted train step: `lower().compile()` raises `at_compile`, or the
  compiled step raises `at_run` when called."""

  def __init__(self, at_compile=None, at_run=None):
    self.at_compile, self.at_run = at_compile, at_run

  def lower(self, *args):
    del args
    return self

  def compile(self):
    if self.at_compile:
      raise self.at_compile
    return self

  def __call__(self, *args):
    raise self.at_run


OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB.\n"
       "BufferAssignment OOM Debugging: many lines that follow")


@pytest.mark.parametrize("where", ["compile", "run"])
def test_out_of_memory_names_what_ran_out_and_the_knobs(tmp_path, monkeypatch, where):
  error = jax.errors.JaxRuntimeError(OOM)
  fake = _FakeStep(at_compile=error if where == "compile" else None, at_run=error)
  monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: fake)
  monkeypatch.setattr(loop.flops_lib, "step_flops", lambda compiled: None)
  config = _small()
  config.model.image.variant = "mu/4"
  with pytest.raises(loop.OutOfMemoryError) as raised:
    loop.train(config, str(tmp_path), train_iter=_train_iter(8))
  message = str(raised.value)
  print(message)
  assert isinstance(raised.value, ValueError)  # the CLI prints ValueErrors without traceback
  assert raised.value.__cause__ is error
  what = "compiling the train step" if where == "compile" else "running train step 1"
  assert message.startswith(f"training: out of device memory while {what} (RESOURCE_EXHAUSTED: "
                            "Out of memory while trying to allocate 1.50GiB.)")
  assert "BufferAssignment" not in message  # only the first line of XLA's message
  for knob in ("--config.batch_size (now 8)", "--config.model.dtype=bfloat16",
               "--config.loss_impl=chunked", "--config.loss_chunk", "--config.loss_impl=ring",
               "--config.mesh.fsdp", "sharding_rules", "--config.model.image.variant (now mu/4)"):
    assert knob in message, knob
  # Other runtime errors pass unchanged.
  other = jax.errors.JaxRuntimeError("INTERNAL: broke")
  monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: _FakeStep(
      at_compile=other if where == "compile" else None, at_run=other))
  with pytest.raises(jax.errors.JaxRuntimeError, match=re.escape("INTERNAL: broke")):
    loop.train(config, str(tmp_path / "other"), train_iter=_train_iter(8))
