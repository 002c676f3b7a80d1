"""The study config's sweeps and the `results` table: cells against numpy, the Wilcoxon test
against an exhaustive enumeration of sign flips."""
import importlib.util
import itertools
import json
import os

import numpy as np
import pytest

from siglip_fair import cli
from siglip_fair import config as cfglib
from siglip_fair.report import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "configs", "study.py")


def _launcher():
  spec = importlib.util.spec_from_file_location("launch_local",
                                                os.path.join(REPO, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CELLS = {("baseline", "0%"), ("balanced", "0%"), ("balanced_proxies", "0%"), ("balanced", "90%")}


def _args(arg):
  return dict(item.split("=", 1) for item in arg.split(","))


def test_local_sweep_is_six_seeds_of_the_four_cells_the_findings_compare():
  _, module = cfglib.load_config_file(STUDY)
  runs = _launcher().run_names(module, "", "sweep_local")
  # 6 seeds: the smallest n whose two-sided exact Wilcoxon p can reach 0.05 (2 / 2^6).
  assert len(runs) == 6 * 4 == len({n for n, _ in runs})
  cells = {}
  for name, arg in runs:
    config = cfglib.get_config(f"{STUDY}:{arg}")
    s = config.study
    cells.setdefault((s.data, s.switch), set()).add(s.seed)
    assert config.data_version == module.data_version(s.data, s.switch)
    assert config.model.image.variant == "mu/8" and s.train_size == config.world.sizes.train
  assert set(cells) == CELLS and all(seeds == set(range(6)) for seeds in cells.values())
  assert 2 / 2 ** 6 <= 0.05 < 2 / 2 ** 5
  with pytest.raises(ValueError, match="switch='50%'"):
    cfglib.get_config(f"{STUDY}:data=balanced,switch=50%")
  with pytest.raises(ValueError, match="no sweep_tpu"):
    _launcher().run_names(module, "", "sweep_tpu")


def test_gpu_sweep_crosses_model_width_examples_and_train_size():
  _, module = cfglib.load_config_file(STUDY)
  runs = _launcher().run_names(module, "", "sweep_gpu")
  axes = ("model", "embed", "examples", "train_size")
  combos = [tuple(_args(arg).get(k, "0%") for k in (*axes, "data", "switch", "seed"))
            for _, arg in runs]
  levels = [sorted({c[i] for c in combos}) for i in range(len(axes))]
  assert [len(v) for v in levels] == [2, 2, 2, 2]
  # Every combination of the four scale axes, the four cells and six seeds, once each.
  expected = {(*scale, data, switch, str(seed)) for scale in itertools.product(*levels)
              for data, switch in CELLS for seed in range(6)}
  assert len(runs) == 2 ** 4 * 4 * 6 == len(set(combos)) and set(combos) == expected
  # One config per context: the arguments reach the model, the world and config.study.
  for scale in itertools.product(*levels):
    arg = next(a for _, a in runs if tuple(_args(a)[k] for k in axes) == scale)
    config = cfglib.get_config(f"{STUDY}:{arg}")
    model, embed, examples, train_size = scale
    assert (config.model.image.variant, config.model.embed_dim, config.total,
            config.world.sizes.train, config.world.image_size) == (
                model, int(embed), examples, int(train_size), 64)
    assert (config.study.model, config.study.embed, config.study.examples,
            config.study.train_size) == (model, int(embed), examples, int(train_size))
  assert cfglib.get_config(f"{STUDY}:scale=gpu").study.train_size == 500_000
  with pytest.raises(ValueError, match="train_size=-1"):
    cfglib.get_config(f"{STUDY}:train_size=-1")


def _write_run(root, name, study, metrics):
  folder = os.path.join(root, name)
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"study": study, "seed": study["seed"]}, f)
  if metrics is not None:
    with open(os.path.join(folder, "eval.json"), "w") as f:
      json.dump(metrics, f)


def _exact_wilcoxon_p(d):
  """Two-sided exact p of the signed-rank statistic min(W+, W-), by enumerating all 2^n sign
  assignments of the ranks (no ties, no zeros)."""
  ranks = np.argsort(np.argsort(np.abs(d))) + 1
  observed = min(ranks[d > 0].sum(), ranks[d < 0].sum())
  count = 0
  for signs in itertools.product((1, -1), repeat=len(d)):
    s = np.array(signs)
    count += min(ranks[s > 0].sum(), ranks[s < 0].sum()) <= observed
  return count / 2 ** len(d)


def test_results_table_means_and_paired_wilcoxon(tmp_path):
  rng = np.random.default_rng(0)
  base = dict(scale="local", model="mu/8", width=64, embed=64, examples="115200ex",
              loss="sigmoid")
  rb = {}
  for seed in range(5):
    for data, switch in (("baseline", "0%"), ("balanced", "0%"), ("balanced", "90%")):
      value = float(rng.normal(0.3 if data == "baseline" else 0.1, 0.05))
      rb[(data, switch, seed)] = value
      _write_run(tmp_path, f"{data}_{switch}_{seed}", dict(base, data=data, switch=switch,
                                                           seed=seed),
                 {"bias/rb": value, "zeroshot/top1": 0.5, "bias/rb_lo": 0.0})
  _write_run(tmp_path, "unfinished", dict(base, data="balanced", switch="10%", seed=0), None)
  assert cli.main(["results", "--workdir", str(tmp_path)]) == 0
  rows, unfinished = sweep.collect(str(tmp_path))
  assert len(rows) == 15 and unfinished == ["unfinished"]
  table = {(c["data"], c["switch"]): c for c in sweep.cells(rows)}
  for (data, switch), cell in table.items():
    v = np.array([rb[(data, switch, s)] for s in range(5)])
    assert cell["n"] == 5 and cell["bias/rb"] == pytest.approx([v.mean(), v.std(ddof=1)])
  tests = {(t["switch"], t["metric"]): t for t in sweep.wilcoxon_vs_baseline(rows)}
  for switch in ("0%", "90%"):
    d = np.array([rb[("balanced", switch, s)] - rb[("baseline", "0%", s)] for s in range(5)])
    t = tests[(switch, "bias/rb")]
    assert t["n"] == 5 and t["mean_diff"] == pytest.approx(d.mean())
    assert t["p"] == pytest.approx(_exact_wilcoxon_p(d))
    # Identical values in both cells: no evidence of a difference.
    assert tests[(switch, "zeroshot/top1")]["p"] == 1.0
  md = (tmp_path / "results.md").read_text()
  assert "| balanced | 90% | 5 |" in md and "unfinished" in md
  csv_rows = (tmp_path / "results.csv").read_text().splitlines()
  assert len(csv_rows) == 1 + 3 * 2  # header + 3 cells x 2 metrics
  assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_results_without_finished_runs_is_an_error(tmp_path, capsys):
  assert cli.main(["results", "--workdir", str(tmp_path)]) == 1
  assert "no finished runs" in capsys.readouterr().err


def _write_run_with_batch(root, name, study, batch_size, step, metrics):
  folder = os.path.join(root, name)
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"study": study, "seed": study["seed"], "batch_size": batch_size, "total": step},
              f)
  with open(os.path.join(folder, "eval.json"), "w") as f:
    json.dump({**metrics, "step": step}, f)


def test_results_record_the_examples_each_run_saw(tmp_path):
  # Launched with --config.total=30 --config.batch_size=32 while config.study still says
  # the scale's nominal 115200ex: the run saw 30 × 32 = 960 examples.
  rng = np.random.default_rng(5)
  study = dict(scale="local", model="mu/8", width=64, embed=64, examples="115200ex",
               loss="sigmoid", switch="0%")
  seen = {}
  for seed in range(3):
    for data, (batch, step) in (("baseline", (32, 30)), ("balanced", (128, 900))):
      value = float(rng.normal())
      seen[(data, seed)] = (batch * step, value)
      _write_run_with_batch(tmp_path, f"{data}_{seed}", dict(study, data=data, seed=seed),
                            batch, step, {"bias/rb": value})
  # A run whose nominal value is right, and one with an unequal step: its own cell.
  _write_run_with_batch(tmp_path, "extra", dict(study, data="balanced", seed=7, examples="2ep"),
                        128, 450, {"bias/rb": 1.0})
  rows, _ = sweep.collect(str(tmp_path))
  by_run = {r["run"]: r for r in rows}
  for (data, seed), (examples, _) in seen.items():
    row = by_run[f"{data}_{seed}"]
    assert row["examples"] == f"{examples}ex" and row["examples_seen"] == examples
    assert row["examples_config"] == "115200ex"
  assert by_run["extra"]["examples"] == "57600ex"
  table = {(c["data"], c["examples"]): c for c in sweep.cells(rows)}
  assert set(table) == {("baseline", "960ex"), ("balanced", "115200ex"),
                        ("balanced", "57600ex")}
  for data, examples in (("baseline", "960ex"), ("balanced", "115200ex")):
    v = np.array([seen[(data, s)][1] for s in range(3)])
    assert table[(data, examples)]["n"] == 3
    assert table[(data, examples)]["bias/rb"] == pytest.approx([v.mean(), v.std(ddof=1)])
  # Baseline and balanced saw different amounts of data: no paired test between them.
  assert sweep.wilcoxon_vs_baseline(rows) == []
  sweep.write_results(str(tmp_path))
  csv_rows = [line.split(",") for line in (tmp_path / "results.csv").read_text().splitlines()]
  column = csv_rows[0].index("examples")
  assert sorted(r[column] for r in csv_rows[1:]) == ["115200ex", "57600ex", "960ex"]
  md = (tmp_path / "results.md").read_text()
  assert "| 960ex | baseline | 3 |" in md and "| 115200ex | balanced | 3 |" in md
  assert "baseline_0 (115200ex → 960ex)" in md and "extra (2ep → 57600ex)" in md
  assert "balanced_0 (" not in md  # its nominal value was right
  assert "points" in md


def test_examples_seen_needs_step_and_batch_size():
  assert sweep.examples_seen({"batch_size": 32}, {"step": 30}) == 960
  assert sweep.examples_seen({}, {"step": 30}) is None
  assert sweep.examples_seen({"batch_size": 32}, {}) is None
  assert sweep.examples_seen({"batch_size": True}, {"step": 3}) is None


def test_results_group_by_the_training_set_size_each_run_trained_on(tmp_path):
  study = dict(scale="local", model="mu/8", width=64, embed=64, examples="", loss="sigmoid",
               switch="0%", train_size=20000)
  rng = np.random.default_rng(3)
  values = {}
  for train in (1000, 2000):
    for data in ("baseline", "balanced"):
      for seed in range(4):
        values[(train, data, seed)] = float(rng.normal())
        folder = tmp_path / f"{data}_{train}_{seed}"
        folder.mkdir()
        # config.json's world is what the run trained on; the study block's 20000 is stale.
        (folder / "config.json").write_text(json.dumps(
            {"study": dict(study, data=data, seed=seed), "batch_size": 8,
             "world": {"sizes": {"train": train}}}))
        (folder / "eval.json").write_text(json.dumps(
            {"bias/rb": values[(train, data, seed)], "step": 5}))
  # A run without a world in its config.json keeps the study's value.
  _write_run(tmp_path, "no_world", dict(study, data="baseline", seed=0), {"bias/rb": 0.0})
  rows, _ = sweep.collect(str(tmp_path))
  assert {r["run"]: r["train_size"] for r in rows}["no_world"] == "20000"
  table = {(c["train_size"], c["data"]): c for c in sweep.cells(rows)}
  assert set(table) == {("1000", "baseline"), ("1000", "balanced"), ("2000", "baseline"),
                        ("2000", "balanced"), ("20000", "baseline")}
  tests = {t["train_size"]: t for t in sweep.wilcoxon_vs_baseline(rows)
           if t["metric"] == "bias/rb"}
  assert set(tests) == {"1000", "2000"}  # paired only with the baseline of the same size
  for train in (1000, 2000):
    d = [values[(train, "balanced", s)] - values[(train, "baseline", s)] for s in range(4)]
    assert tests[str(train)]["mean_diff"] == pytest.approx(np.mean(d))
    assert tests[str(train)]["n"] == 4
  sweep.write_results(str(tmp_path))
  header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
  assert "train_size" in header
  assert "| 1000 | baseline |" in (tmp_path / "results.md").read_text()
