"""benchmarks/accelerator_check.py runs end to end without a GPU (--cpu-smoke) and its JSON holds
every part's numbers: finite, positive, consistent with each other and with a numpy reference
for the loss values; without --cpu-smoke on a CPU it refuses with a JSON line saying why, and
at its deadline the last line is still the JSON (so far)."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "accelerator_check.py")
PEAK = 1e11  # a nominal peak FLOP/s, so that the CPU run computes MFU too
HUGE = "100000"  # budgets and deadline no CI machine reaches: every trial runs, none skipped


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # Two devices: the ring loss runs; fewer per-device copies to checkpoint than 8.
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                       # Compile-time knobs for CI (XLA CPU): the legacy emitters compile the
                       # smoke's train steps about 3x faster than the fusion emitters.
                       "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        env=env, cwd=REPO, check=False)
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr[-3000:]
  return proc, lines


@pytest.fixture(scope="module")
def smoke():
  proc, lines = _run("--cpu-smoke", "--peak-flops", str(PEAK), "--deadline-s", HUGE,
                     "--budget-s", f"b16={HUGE},loss={HUGE},demo={HUGE}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert any(line.startswith("[accelerator_check") for line in lines[:-1])  # progress lines
  return json.loads(lines[-1])


def _positive(row, keys):
  for key in keys:
    value = row[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, row)


def test_smoke_json_structure(smoke):
  assert smoke["mode"] == "cpu-smoke" and smoke["backend"] == "cpu"
  assert smoke["jax"] == jax.__version__ and smoke["device"] == jax.devices("cpu")[0].device_kind
  assert smoke["devices"].startswith("devices: 2 x cpu")
  assert smoke["errors"] == [] and smoke["skipped"] == [] and smoke["deadline_hit"] is False
  assert set(smoke) >= {"b16", "loss", "demo", "budget_s", "elapsed_s", "remat"}
  _positive(smoke, ["elapsed_s"])


def test_smoke_b16_rows(smoke):
  part = smoke["b16"]
  assert part["dtype"] == "bfloat16" and part["peak_flops"] == PEAK
  rows = {r["remat"]: r for r in part["rows"]}
  assert set(rows) == set(part["best"]) == {"none", "full"}
  for row in rows.values():
    assert row["status"] == "ok"
    _positive(row, ["batch", "compile_s", "step_ms", "examples_per_sec", "model_flops_per_step",
                    "flops_per_step", "mfu", "hfu", "program_gib", "first_loss", "timed_steps"])
    np.testing.assert_allclose(row["examples_per_sec"], row["batch"] / row["step_ms"] * 1e3,
                               rtol=1e-9)
    steps_per_sec = 1e3 / row["step_ms"]
    np.testing.assert_allclose(row["mfu"], row["model_flops_per_step"] * steps_per_sec / PEAK,
                               rtol=1e-9)
    np.testing.assert_allclose(row["hfu"], row["flops_per_step"] * steps_per_sec / PEAK,
                               rtol=1e-9)
  none, full = rows["none"], rows["full"]
  assert none["batch"] == full["batch"]
  # Model FLOPs are the step without remat at that batch, whatever the row's mode; the compiled
  # program under full remat recomputes each block's forward pass, so it counts more.
  assert full["model_flops_per_step"] == none["model_flops_per_step"]
  assert full["flops_per_step"] > none["flops_per_step"]
  # Same initial parameters, same batch: the first step's loss is the same (remat changes what
  # the backward pass keeps, not the forward value; 1e-3 leaves room for bf16 fusion rounding).
  np.testing.assert_allclose(full["first_loss"], none["first_loss"], rtol=1e-3)


def _numpy_sigmoid_loss(batch, dim, t=10.0, b=-10.0):
  """The script's embeddings (normal draws from key(batch), L2-normalised), scored in float64."""
  z = np.asarray(jax.random.normal(jax.random.key(batch), (2, batch, dim)), np.float64)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  logits = t * z[0] @ z[1].T + b
  labels = 2 * np.eye(batch) - 1
  return float(np.mean(np.sum(np.logaddexp(0.0, -labels * logits), axis=1)))


def test_smoke_loss_rows(smoke):
  part = smoke["loss"]
  rows = {r["impl"]: r for r in part["rows"]}
  assert set(rows) == set(part["largest"]) == {"full", "chunked", "ring"}
  assert rows["ring"]["devices"] == 2 and rows["full"]["devices"] == 1
  for impl, row in rows.items():
    assert row["status"] == "ok"
    _positive(row, ["batch", "ms", "value", "program_gib", "temp_gib", "compile_s"])
    want = _numpy_sigmoid_loss(row["batch"], part["dim"])
    np.testing.assert_allclose(row["value"], want, rtol=1e-5, err_msg=impl)
    if impl != "full":
      assert row["rel_diff_vs_full"] <= 1e-5
      _positive(row, ["time_ratio_vs_full"])
  # What the chunked loss is for: a [chunk, B] block instead of the [B, B] logits.
  assert part["chunk"] < rows["full"]["batch"]
  assert rows["chunked"]["temp_gib"] < rows["full"]["temp_gib"]


def test_smoke_demo(smoke):
  demo = smoke["demo"]
  _positive(demo, ["steps_per_sec", "examples_per_sec", "train_call_s", "windows", "batch"])
  np.testing.assert_allclose(demo["examples_per_sec"], demo["steps_per_sec"] * demo["batch"],
                             rtol=1e-9)
  # The real loop trained: a few steps on four fixed batches bring the loss well down.
  assert demo["final_loss"] < 0.8 * demo["first_loss"]


def test_refuses_a_cpu_without_smoke_mode():
  proc, lines = _run("--parts", "demo")
  assert proc.returncode == 2
  result = json.loads(lines[-1])
  assert result["backend"] == "cpu" and "demo" not in result
  assert any("--cpu-smoke" in s for s in result["skipped"])


def test_deadline_still_ends_with_the_json():
  # A deadline already past: the watchdog fires at once, whatever the parts are doing.
  proc, lines = _run("--cpu-smoke", "--parts", "demo", "--deadline-s", "0")
  assert proc.returncode == 3, proc.stderr[-3000:]
  result = json.loads(lines[-1])
  assert result["deadline_hit"] is True and result["mode"] == "cpu-smoke"
  assert any(s.startswith("deadline reached") for s in result["skipped"])
