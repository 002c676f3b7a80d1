"""The variance decomposition (report/noise.py) recovers planted components."""
import math

import numpy as np
import pytest

from siglip_fair.report import noise


def test_closed_form_on_a_tiny_case():
  # Two seeds; consecutive differences (1, -1) and (2,): step var = mean(0.5*1, 0.5*4) = 1.25.
  out = noise.decompose([[0.0, 1.0, 0.0], [3.0, 5.0]], [10.0, 14.0], [9.0, 13.0], [11.0, 15.0])
  assert out["step_var"] == pytest.approx(1.25)
  assert out["seed_var"] == pytest.approx(np.var([10.0, 14.0], ddof=1) - 1.25)
  assert out["eval_var"] == pytest.approx((2 / (2 * noise.Z95)) ** 2)
  assert out["mean"] == 12.0 and out["max_jump_rel"] == pytest.approx(2 / 12)
  assert out["snr_total"] == pytest.approx(12 / math.sqrt(out["seed_var"] + 1.25 + out["eval_var"]))


@pytest.mark.parametrize("seed", range(5))
def test_recovers_planted_seed_and_step_variances(seed):
  rng = np.random.default_rng(seed)
  seeds, steps = 400, 60
  seed_sd, step_sd, eval_sd = rng.uniform(0.5, 3), rng.uniform(0.2, 2), rng.uniform(0.1, 1)
  offsets = 10 + seed_sd * rng.standard_normal(seeds)
  trend = np.linspace(0, 1, steps)  # a slow drift that consecutive differences barely see
  curves = offsets[:, None] + trend + step_sd * rng.standard_normal((seeds, steps))
  finals = curves[:, -1]
  half = noise.Z95 * eval_sd
  out = noise.decompose(list(curves), finals, finals - half, finals + half)
  assert out["step_var"] == pytest.approx(step_sd ** 2, rel=0.1)
  assert out["seed_var"] == pytest.approx(seed_sd ** 2, rel=0.25, abs=0.1)
  assert out["eval_var"] == pytest.approx(eval_sd ** 2)


def test_from_runs_takes_the_last_half_and_intervals():
  records = [[{"step": s, "bias/rb": float(s // 10 % 2)} for s in (10, 20, 30, 40)],
             [{"step": s, "bias/rb": 2.0} for s in (10, 20, 30, 40)] + [{"step": 40, "loss": 1}]]
  finals = [{"bias/rb": 1.0, "bias/rb_lo": 0.0, "bias/rb_hi": 2.0},
            {"bias/rb": 2.0, "bias/rb_lo": 1.0, "bias/rb_hi": 3.0}]
  out = noise.from_runs(records, finals, "bias/rb")
  # Last half: steps 20, 30, 40 -> (0, 1, 0) and (2, 2, 2).
  assert out["step_var"] == pytest.approx(0.25)  # mean of 0.5 * mean((1, 1)) and 0
  with pytest.raises(ValueError, match="no evaluation"):
    noise.from_runs(records, finals, "bias/ab_mean")


def test_noise_benchmark_decomposes_trained_runs_without_training(tmp_path, capsys):
  """benchmarks/noise.py --runs reads each folder's metrics.jsonl and eval.json: its JSON line
  equals report/noise.py's from_runs on the same files, and a folder without eval.json (an
  unfinished run) is refused by name."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "noise.py")
  spec = importlib.util.spec_from_file_location("noise_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rng = np.random.default_rng(0)
  records, finals = [], []
  for seed in range(3):
    run = tmp_path / f"seed={seed}"
    run.mkdir()
    rows = [{"step": s, "bias/rb": float(rng.normal(10, 2))} for s in range(10, 110, 10)]
    final = {"bias/rb": rows[-1]["bias/rb"], "bias/rb_lo": rows[-1]["bias/rb"] - 1,
             "bias/rb_hi": rows[-1]["bias/rb"] + 1.5}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(json.dumps(final))
    records.append(rows)
    finals.append(final)
  assert bench.main(["--runs", str(tmp_path / "seed=*")]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(out) == {"bias/rb"}
  assert out["bias/rb"] == pytest.approx(noise.from_runs(records, finals, "bias/rb"))
  (tmp_path / "seed=3").mkdir()
  with pytest.raises(SystemExit):
    bench.main(["--runs", str(tmp_path / "seed=*")])
  assert "seed=3 has no eval.json" in capsys.readouterr().err
