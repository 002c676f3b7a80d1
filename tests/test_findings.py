"""Verdicts on the paper's findings (report/findings.py): the signed-rank p against scipy's
exact test and an enumeration of sign flips, the t-interval against scipy and its coverage, and
`results` on fake sweeps with planted effects (paper's direction, none, reversed)."""
import itertools
import json
import os
import re

import numpy as np
import pytest
from scipy import stats

from siglip_fair import cli
from siglip_fair.report import findings, sweep

PAIRS = ("librarian_scientist", "nurse_doctor", "housekeeper_homeowner",
         "receptionist_executive", "secretary_manager")
CELLS = {"B": ("baseline", "0%"), "Bal": ("balanced", "0%"), "P": ("balanced_proxies", "0%"),
         "FT": ("balanced", "90%")}
# Per cell: signed RB, signed AB of every pair (so AB mean = |that|), zero-shot top-1, R@1.
# The paper's findings, in points / fractions, with the data's skew toward men (RB > 0) and
# its stereotypes (AB > 0).
PAPER = {"B": (15, 30, 0.50, 0.30), "Bal": (4, 5, 0.60, 0.20), "P": (1, 12, 0.60, 0.20),
         "FT": (5, 25, 0.55, 0.25)}
# Each claim the other way round: RB and AB against the data's skew, balancing raising |RB|
# and AB, proxies raising |RB| and lowering AB, FT raising |RB| and going below Bal on AB,
# balancing lowering top-1 and raising R@1.
REVERSED = {"B": (-15, -30, 0.60, 0.20), "Bal": (20, 40, 0.50, 0.30),
            "P": (30, 35, 0.50, 0.30), "FT": (20, 35, 0.55, 0.25)}
NULL = {cell: (0, 0, 0.5, 0.3) for cell in CELLS}


def _enumerated_p(d):
  """P(|W+ − W−| >= observed) over all 2^n sign assignments of the average ranks of |d|, zeros
  dropped: the exact conditional null, ties included."""
  d = np.asarray(d, float)
  d = d[d != 0]
  if d.size == 0:
    return 1.0
  ranks = stats.rankdata(np.abs(d))
  observed = abs(ranks[d > 0].sum() - ranks[d < 0].sum())
  hits = sum(abs(np.dot(ranks, s)) >= observed - 1e-9
             for s in itertools.product((1, -1), repeat=d.size))
  return hits / 2 ** d.size


def test_signed_rank_p_is_scipys_exact_p_and_the_enumeration_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(300):
    d = rng.normal(rng.normal(), 1, size=rng.integers(1, 16))
    assert findings.signed_rank_p(d) == pytest.approx(
        stats.wilcoxon(d, method="exact").pvalue, rel=1e-9, abs=1e-12)
  for _ in range(200):  # ties and zeros, where scipy's exact table does not apply
    d = rng.integers(-3, 5, size=rng.integers(1, 11)).astype(float)
    assert findings.signed_rank_p(d) == pytest.approx(_enumerated_p(d), rel=1e-9, abs=1e-12)
  assert findings.signed_rank_p([0, 0, 0]) == 1.0
  assert findings.signed_rank_p(np.arange(1, 7)) == pytest.approx(2 / 64)


def test_wilcoxon_vs_baseline_is_scipys_exact_paired_test():
  rng = np.random.default_rng(1)
  for trial in range(40):
    n = int(rng.integers(2, 13))
    x, y = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
    rows = [{**{k: "" for k in sweep.FACTORS}, "data": data, "switch": "0%", "seed": s,
             "bias/rb": float(v[s])} for data, v in (("baseline", y), ("balanced", x))
            for s in range(n)]
    t, = sweep.wilcoxon_vs_baseline(rows, metrics=("bias/rb",))
    assert t["n"] == n and t["p"] == pytest.approx(
        stats.wilcoxon(x, y, method="exact").pvalue, rel=1e-9), trial


def test_t_interval_is_scipys_and_covers_the_mean_95_percent_of_the_time():
  rng = np.random.default_rng(2)
  v = rng.normal(size=6)
  assert findings.t_interval(v) == pytest.approx(
      stats.t.interval(0.95, 5, loc=v.mean(), scale=stats.sem(v)))
  assert all(np.isnan(findings.t_interval([1.0])))
  covered = [lo <= 3.0 <= hi for lo, hi in
             (findings.t_interval(rng.normal(3.0, 2.0, size=6)) for _ in range(2000))]
  # Binomial(2000, 0.95): sd 0.005, so the bounds are 4 sd wide on each side.
  assert 0.93 <= np.mean(covered) <= 0.97


def _write_sweep(root, means, noise, seed=0, seeds=6, world=True):
  """Fake runs of the four cells; returns {(cell, seed): eval.json metrics}."""
  rng = np.random.default_rng(seed)
  study = dict(scale="local", model="mu/8", width=64, embed=64, examples="", train_size=20000,
               loss="sigmoid")
  written = {}
  for cell, (data, switch) in CELLS.items():
    for s in range(seeds):
      rb, ab, top1, r1 = means[cell]
      gaps = ab + noise[1] * rng.normal(size=len(PAIRS))
      metrics = {"bias/rb": rb + noise[0] * rng.normal(), "bias/ab_mean": np.abs(gaps).mean(),
                 "zeroshot/top1": top1 + noise[2] * rng.normal(),
                 "retrieval/i2t_r1": r1 + noise[2] * rng.normal(),
                 "retrieval/t2i_r1": r1 + noise[2] * rng.normal(),
                 **{f"bias/ab/{p}": g for p, g in zip(PAIRS, gaps)}}
      metrics = {**{k: float(v) for k, v in metrics.items()}, "step": 10}
      folder = os.path.join(root, f"{data}_{switch}_{s}".replace("%", "pct"))
      os.makedirs(folder)
      config = {"study": dict(study, data=data, switch=switch, seed=s), "batch_size": 8}
      if world:
        config["world"] = {"woman_prevalence": 0.3, "association": 0.4,
                           "sizes": {"train": 20000}}
      with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
      with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(metrics, f)
      written[(cell, s)] = metrics
  return written


def _claim_values(written, quantity, cell, reference, seeds=6):
  get = {"rb": lambda m: m["bias/rb"], "rb_abs": lambda m: abs(m["bias/rb"]),
         "ab_signed": lambda m: np.mean([m[f"bias/ab/{p}"] for p in PAIRS]),
         "ab": lambda m: m["bias/ab_mean"], "top1": lambda m: m["zeroshot/top1"],
         "r1": lambda m: (m["retrieval/i2t_r1"] + m["retrieval/t2i_r1"]) / 2}[quantity]
  return np.array([get(written[(cell, s)]) - (get(written[(reference, s)]) if reference else 0)
                   for s in range(seeds)])


def _results(root):
  with open(os.path.join(root, "results_findings.json")) as f:
    contexts = json.load(f)["contexts"]
  assert len(contexts) == 1
  return {f["id"]: f for f in contexts[0]["findings"]}, contexts[0]


@pytest.mark.parametrize("means,expected", [(PAPER, "reproduced"),
                                            (REVERSED, "not reproduced")])
def test_planted_effects_give_their_verdicts_with_scipys_p_and_t_interval(
    tmp_path, capsys, means, expected):
  written = _write_sweep(tmp_path, means, noise=(0.3, 0.3, 0.005))
  assert cli.main(["results", "--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  got, context = _results(tmp_path)
  assert list(got) == ["F1", "F2", "F3", "F4", "F5"]
  for f, q, cell, ref, _ in findings.CLAIMS:
    claim, = [c for c in got[f]["claims"] if (c["cell"], c["reference"]) == (cell, ref)
              and c["quantity"] == findings.QUANTITIES[q][0]]
    d = _claim_values(written, q, cell, ref)
    assert claim["n"] == 6 and claim["effect"] == pytest.approx(d.mean())
    # Every seed moved the planted way: scipy's exact p is 2 / 2^6.
    assert claim["p"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue) == 2 / 64
    assert claim["ci"] == pytest.approx(list(stats.t.interval(
        0.95, 5, loc=d.mean(), scale=stats.sem(d))))
    assert claim["verdict"] == expected, (f, q)
  assert {f["verdict"] for f in got.values()} == {expected}
  assert [line.split(":")[1] for line in out.splitlines() if line.startswith("results: F")] == [
      f" F{i} {expected}" for i in range(1, 6)]
  assert context["context"]["examples"] == "80ex"
  md = (tmp_path / "results.md").read_text()
  assert "## Findings (SPEC §5)" in md and md.count(f"**{expected}**") == 5
  section = md[md.index("## Findings"):].splitlines()
  table = [line for line in section if line.startswith("| ")]
  assert len(table) == 1 + 10  # header + one row per claim
  # Eight columns in every row: the |RB| of a claim must not split its cell.
  assert all(len(re.split(r"(?<!\\)\|", line)) == 8 + 2 for line in table)
  if means is PAPER:  # F4's recovered shares, by hand from the planted means
    b, ft, bal = (np.mean(_claim_values(written, "ab", c, None)) for c in ("B", "FT", "Bal"))
    assert context["f4_recovered"]["ab"] == pytest.approx((b - ft) / (b - bal))


def test_no_planted_effect_is_inconclusive(tmp_path):
  # A draw in which no claim reaches p <= 0.05 by chance (each does with probability 1/32).
  written = _write_sweep(tmp_path, NULL, noise=(5, 5, 0.02), seed=4)
  sweep.write_results(str(tmp_path))
  got, _ = _results(tmp_path)
  for f, q, cell, ref, _ in findings.CLAIMS:
    claim, = [c for c in got[f]["claims"] if (c["cell"], c["reference"]) == (cell, ref)
              and c["quantity"] == findings.QUANTITIES[q][0]]
    d = _claim_values(written, q, cell, ref)
    assert claim["p"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)
    assert claim["p"] > 0.05
    assert claim["verdict"] == "inconclusive"
  assert {f["verdict"] for f in got.values()} == {"inconclusive"}


def test_false_verdicts_under_the_null_occur_at_the_exact_tests_rate():
  # Symmetric noise, 6 seeds: a claim is decided only when all six differences share a sign,
  # probability 2 / 64, whichever way it is then decided.
  rng = np.random.default_rng(5)
  decided = []
  for _ in range(200):
    rows = [{"model": "m", "data": data, "switch": switch, "seed": s, "rb_direction": 1,
             "ab_direction": 1, "bias/rb": rng.normal(), "bias/ab_signed": rng.normal(),
             "bias/ab_mean": rng.normal(), "zeroshot/top1": rng.normal(),
             "retrieval/i2t_r1": rng.normal(), "retrieval/t2i_r1": rng.normal()}
            for data, switch in CELLS.values() for s in range(6)]
    res, = findings.evaluate(rows, ["model"])
    decided += [c["verdict"] != "inconclusive" for f in res["findings"] for c in f["claims"]]
  assert len(decided) == 2000
  assert 0.015 <= np.mean(decided) <= 0.05  # 1/32 = 0.031, sd 0.004


def test_three_seeds_cannot_decide_and_missing_cells_drop_their_findings(tmp_path):
  _write_sweep(tmp_path, PAPER, noise=(0.3, 0.3, 0.005), seeds=3)
  for cell in ("P", "FT"):  # a sweep of baseline and balanced only
    data, switch = CELLS[cell]
    for s in range(3):
      folder = tmp_path / f"{data}_{switch}_{s}".replace("%", "pct")
      os.remove(folder / "eval.json")
      os.remove(folder / "config.json")
  sweep.write_results(str(tmp_path))
  got, _ = _results(tmp_path)
  assert list(got) == ["F1", "F2", "F5"]
  for f in got.values():
    assert f["verdict"] == "inconclusive"
    assert all(c["p"] == pytest.approx(2 / 2 ** 3) for c in f["claims"])


def test_data_directions_follow_the_world_and_the_evaluators_contrast():
  world = {"woman_prevalence": 0.3, "association": 0.4}
  assert findings.data_directions({"world": world}) == (1, 1)
  assert findings.data_directions({"world": dict(world, woman_prevalence=0.7)}) == (-1, 1)
  assert findings.data_directions({"world": dict(world, association=-0.4)}) == (1, -1)
  flipped = {"rb": {"contrast": ["woman", "man"]}, "ab": {"contrast": ["man", "woman"]}}
  assert findings.data_directions({"world": world, "evals": flipped}) == (-1, -1)
  assert findings.data_directions({"world": dict(world, woman_prevalence=0.5)})[0] == 0
  assert findings.data_directions({}) == (0, 0)
  assert findings.data_directions({"world": world, "train_data": "corpus"}) == (0, 0)
  # RB is read on object images: the owners' skew decides it, whatever the people's is.
  owners = dict(world, owner_woman_prevalence=0.9)
  assert findings.data_directions({"world": owners}) == (-1, 1)
  assert findings.data_directions({"world": dict(owners, owner_woman_prevalence=0.0,
                                                 woman_prevalence=0.7)}) == (1, 1)
  assert findings.data_directions({"world": dict(owners, owner_woman_prevalence=0.5)})[0] == 0


def test_without_the_datas_direction_either_sign_reproduces_f1(tmp_path):
  _write_sweep(tmp_path, REVERSED, noise=(0.3, 0.3, 0.005), world=False)
  sweep.write_results(str(tmp_path))
  got, _ = _results(tmp_path)
  assert [c["expected"] for c in got["F1"]["claims"]] == [0, 0]
  assert got["F1"]["verdict"] == "reproduced" and got["F2"]["verdict"] == "not reproduced"


def test_a_seed_with_an_undefined_metric_is_left_out_of_its_claims():
  rows = [{"model": "m", "data": data, "switch": switch, "seed": s, "rb_direction": 1,
           "ab_direction": 1, "bias/rb": 10.0 + s if data == "baseline" else 1.0 + s,
           "bias/ab_mean": float("nan") if s == 0 else 5.0 + s}
          for data, switch in (("baseline", "0%"), ("balanced", "0%")) for s in range(7)]
  res, = findings.evaluate(rows, ["model"])
  f2, = [f for f in res["findings"] if f["id"] == "F2"]
  rb, ab = f2["claims"]
  assert (rb["n"], ab["n"], ab["seeds"]) == (7, 6, [1, 2, 3, 4, 5, 6])
  assert np.isnan(findings.signed_rank_p([1.0, float("nan")]))
