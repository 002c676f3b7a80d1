"""Summary JSON / Markdown and plots."""
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest

from siglip_fair import report
from siglip_fair.report import summary

ROWS = [
    {"model": "baseline", "zeroshot/top1": 0.5, "zeroshot/top1_lo": 0.4,
     "zeroshot/top1_hi": 0.6, "bias/rb": np.float32(20.0), "bias/rb_lo": 12.5,
     "bias/rb_hi": 27.25, "bias/ab/nurse_doctor": 30.0, "bias/ab_mean": 22.0,
     "bias/ab_mean_lo": 15.0, "bias/ab_mean_hi": 29.0, "steps": np.int64(300)},
    {"model": "balanced", "zeroshot/top1": 0.55, "bias/rb": 2.0, "bias/rb_lo": -4.0,
     "bias/rb_hi": 8.0, "bias/ab/nurse_doctor": float("nan"), "bias/ab_mean": 5.0,
     "retrieval/i2t_r1": 0.25},
]


def _table(text):
  """Markdown table lines -> list of cell lists (header first, no separator)."""
  lines = [l for l in text.splitlines() if l.startswith("|")]
  assert set(lines[1]) <= {"|", "-"}
  return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines[:1] + lines[2:]]


def test_write_summary_json_and_markdown(tmp_path):
  json_path, md_path = report.write_summary(ROWS, str(tmp_path))
  with open(json_path) as f:
    records = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert [r["model"] for r in records] == ["baseline", "balanced"]
  assert records[0]["bias/rb"] == 20.0 and records[0]["steps"] == 300
  assert records[0]["zeroshot/top1_lo"] == 0.4
  assert records[1]["bias/ab/nurse_doctor"] is None  # NaN -> null

  with open(md_path) as f:
    cells = _table(f.read())
  assert cells[0] == ["metric", "baseline", "balanced"]
  body = {row[0]: row[1:] for row in cells[1:]}
  assert list(body) == ["zeroshot/top1", "bias/rb", "bias/ab/nurse_doctor",
                        "bias/ab_mean", "steps", "retrieval/i2t_r1"]
  assert body["zeroshot/top1"] == ["0.5 [0.4, 0.6]", "0.55"]
  assert body["bias/rb"] == ["20 [12.5, 27.25]", "2 [-4, 8]"]
  assert body["bias/ab/nurse_doctor"] == ["30", "nan"]
  assert body["retrieval/i2t_r1"] == ["–", "0.25"]
  assert sorted(os.listdir(tmp_path)) == ["summary.json", "summary.md"]
  with open(md_path) as f:
    assert report.format_table(ROWS) in f.read()


def test_table_rejects_unnamed_or_duplicate_models():
  with pytest.raises(ValueError, match="unique"):
    report.format_table([{"model": "a"}, {"model": "a"}])
  with pytest.raises(ValueError, match="'model'"):
    report.format_table([{"bias/rb": 1.0}])


def test_bound_without_its_metric_is_a_metric():
  assert summary.metric_names([{"model": "m", "x_hi": 1.0, "y": 2, "y_lo": 1}]) == ["x_hi", "y"]


def _is_matplotlib_png(path):
  with open(path, "rb") as f:
    data = f.read()
  image = matplotlib.image.imread(path)
  return (data.startswith(b"\x89PNG\r\n\x1a\n") and b"matplotlib" in data
          and image.ndim == 3 and min(image.shape[:2]) > 100)


def test_plot_training_curves(tmp_path):
  paths = {}
  for name, slope in (("baseline", 1.0), ("balanced", 0.5)):
    path = tmp_path / f"{name}.jsonl"
    lines = [{"step": s, "examples_seen": 32 * s, "loss": math.exp(-s / 50)}
             for s in range(10, 101, 10)]
    lines += [{"step": s, "bias/rb": slope * s / 10, "bias/rb_lo": slope * s / 10 - 1,
               "bias/rb_hi": slope * s / 10 + 1, "bias/ab_mean": "nan"}
              for s in (50, 100)]
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    paths[name] = str(path)
  out = report.plot_training_curves(paths, str(tmp_path / "curves.png"),
                                    x="examples_seen")
  assert _is_matplotlib_png(out)
  with pytest.raises(ValueError, match="missing: \\['bias/nope'\\]"):
    report.plot_training_curves(paths, str(tmp_path / "x.png"), metrics=["bias/nope"])
  with pytest.raises(ValueError, match="does not exist"):
    report.plot_training_curves({"a": str(tmp_path / "none.jsonl")}, str(tmp_path / "x.png"))


def test_plot_bias_bars(tmp_path):
  out = report.plot_bias_bars(ROWS, str(tmp_path / "plots" / "bias.png"))
  assert _is_matplotlib_png(out)
  assert os.listdir(tmp_path / "plots") == ["bias.png"]
  with pytest.raises(ValueError, match="No bias metrics"):
    report.plot_bias_bars([{"model": "a", "zeroshot/top1": 1.0}], str(tmp_path / "x.png"))


def _fake_run(folder, rb_curve, final=None):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for i, rb in enumerate(rb_curve, 1):
      f.write(json.dumps({"step": 10 * i, "examples_seen": 320 * i, "loss": 1.0 / i,
                          "bias/rb": rb, "bias/ab_mean": 2 * rb}) + "\n")
  if final is not None:
    with open(os.path.join(folder, "eval.json"), "w") as f:
      json.dump(final, f)


def test_report_subcommand_plots_and_tabulates_every_run(tmp_path, capsys):
  from siglip_fair import cli
  from siglip_fair.report import runs
  _fake_run(tmp_path / "baseline", [30.0, 20.0], {"bias/rb": 19.5, "bias/rb_lo": 18.0,
                                                  "bias/rb_hi": 21.0, "step": 20})
  _fake_run(tmp_path / "sweep" / "balanced", [10.0, 4.0, 2.0])  # unfinished: no eval.json
  os.makedirs(tmp_path / "sweep" / "balanced" / "checkpoints" / "30")
  assert runs.find_runs(str(tmp_path)) == {
      "baseline": str(tmp_path / "baseline"),
      os.path.join("sweep", "balanced"): str(tmp_path / "sweep" / "balanced")}
  assert runs.final_metrics(str(tmp_path / "sweep" / "balanced")) == {
      "step": 30, "bias/rb": 2.0, "bias/ab_mean": 4.0}
  assert cli.main(["report", "--workdir", str(tmp_path)]) == 0
  table = (tmp_path / "report.md").read_text()
  assert "19.5 [18, 21]" in table and "| bias/ab_mean" in table
  assert [line.split("|")[3].strip() for line in table.splitlines()
          if line.startswith("| bias/rb ")] == ["2"]
  image = matplotlib.image.imread(tmp_path / "report.png")
  assert image.ndim == 3 and image.shape[0] > 100
  # Runs named explicitly; a folder without metrics is an error that names it.
  assert cli.main(["report", "--workdir", str(tmp_path / "out"), "--runs",
                   str(tmp_path / "baseline")]) == 0
  assert cli.main(["report", "--workdir", str(tmp_path / "out"), "--runs",
                   str(tmp_path / "nothing")]) == 1
  assert "'nothing'" in capsys.readouterr().err
  assert cli.main(["report", "--workdir", str(tmp_path / "empty")]) == 1
  assert "no runs to report" in capsys.readouterr().err


def test_every_rb_and_ab_metric_is_in_points():
  points = ["bias/rb", "bias/rb_lo", "bias/rb_hi", "bias/ab/nurse_doctor",
            "bias/ab/nurse_doctor_hi", "bias/ab_mean", "bias/ab_mean_lo", "bias/ab_argmax/a_b",
            "bias/ab_argmax_mean_hi", "data/rb", "data/before/rb", "data/after/ab/nurse_doctor",
            "data/ab_mean", "data/after/ab_mean_lo"]
  other = ["zeroshot/top1", "zeroshot/top1_lo", "bias/gender_acc", "bias/gender_acc_gap",
           "data/prevalence/man", "kept_fraction", "bias/maxskew@10", "bias/ndkl@10_max",
           "retrieval/i2t_r1", "loss", "steps", "bias/rbx", "tab/x"]
  assert [summary.metric_unit(m) for m in points] == ["points"] * len(points)
  assert [summary.metric_unit(m) for m in other] == [""] * len(other)
  assert "points" in summary.UNITS_NOTE and "[0, 1]" in summary.UNITS_NOTE


def test_tables_and_plots_state_the_unit(tmp_path, monkeypatch):
  from siglip_fair.report import plots, runs
  _, md_path = report.write_summary(ROWS, str(tmp_path))
  assert summary.UNITS_NOTE in open(md_path).read()
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or out)
  report.plot_bias_bars(ROWS, str(tmp_path / "bias.png"))
  _fake_run(tmp_path / "run", [3.0, 2.0], {"bias/rb": 2.0, "step": 20})
  runs.write_report(runs.find_runs(str(tmp_path / "run")), str(tmp_path / "out"))
  assert summary.UNITS_NOTE in (tmp_path / "out" / "report.md").read_text()
  labels = {ax.get_title(): ax.get_ylabel() for fig in figures for ax in fig.axes
            if ax.get_visible()}
  assert labels == {"bias/rb": "points", "bias/ab_mean": "points",
                    "bias/ab/nurse_doctor": "points", "loss": ""}
