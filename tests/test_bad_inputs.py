"""Bad-input catalogue: every way of feeding bad input that users of big_vision / open_clip style
stacks hit, fed to the entry point where they hit it (the `siglip-fair` command line, the corpus
importer's command line, or the library function they call).

Each case checks that
  (a) one clear message names the problem (field / file / shard / row) and says the fix;
  (b) the command exits non-zero (2: config error, 1: error while running), or the library
      raises a ValueError / FileNotFoundError subclass (which `cli.main` turns into exit 1);
  (c) nothing already written is overwritten or left half-written: the workdir holds an earlier
      run's results whose bytes and mtimes are unchanged afterwards, and no new file appears.
Partly broken corpora are the exception to (b) by design: the importer skips and counts broken
entries, and its report is the message; a corpus with no usable entry is an error.

CASES is the catalogue (one test per case, `test_<id>`): what is fed in, a fragment of the
message that names the problem, and one that says the fix. With BAD_INPUTS_LOG=<file> set, every
case appends {"case", "message"} to that file (the table of the issue's closing note).
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from typing import NamedTuple

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from siglip_fair import cli
from siglip_fair.balance import shards
from siglip_fair.data import faces, imports
from siglip_fair.data.tokenizer import Tokenizer
from siglip_fair.debias import infer
from siglip_fair.models import big_vision, make_model
from siglip_fair.train import checkpoint
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.state import make_init_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Case(NamedTuple):
  id: str
  fed: str      # the bad input, as a user would give it
  problem: str  # fragment of the message naming the problem
  fix: str      # fragment of the message saying the fix


CASES = [
    Case("unknown_config_key", "train --config.optim.learning_rate=1",
         "optim has no field 'learning_rate'", "its fields are"),
    Case("wrong_type", "train --config.batch_size=big",
         "--config.batch_size expects int", "like its current value 128"),
    Case("zero_batch_size", "train --config.batch_size=0",
         "config.batch_size=0 must be a positive integer", "e.g. --config.batch_size=256"),
    Case("zero_total_steps", "train --config.total=0",
         "config.total='0' gives 0 steps", "set --config.total to steps"),
    Case("zero_mesh_axis", "train --config.mesh.data=0",
         "config.mesh={'data': 0}: sizes must be positive", "e.g. --config.mesh.data=-1"),
    Case("negative_world_size", "train --config.world.sizes.train=-5",
         "world.sizes.train=-5 must be a number of examples >= 0",
         "e.g. --config.world.sizes.train=20000"),
    Case("negative_embed_dim", "train --config.model.embed_dim=-8",
         "config.model.embed_dim=-8 must be a positive integer", "--config.model.embed_dim=64"),
    Case("missing_manual_dir", "faces.build('fairface', manual_dir=<absent folder>)",
         "fairface_download is missing or empty", "fairface_label_train.csv"),
    Case("unprepared_eval_dataset",
         "train --config.eval_data.ff.dataset=fairface --config.eval_data.ff.split=validation "
         "--config.eval_data.ff.data_dir=<empty folder>",
         "fairface is not prepared under", "siglip_fair.data.faces.build('fairface'"),
    Case("empty_split", "train --config.world.sizes.objects=0",
         "world.sizes.objects=0", "--config.world.sizes.objects=100"),
    Case("corrupted_arrayrecord_shard", "train with bytes overwritten inside the train shard",
         "synthetic_world-train.array_record-00000-of-00001 cannot be read",
         "regenerates the world"),
    Case("undecodable_image", "import of a webdataset shard with a broken JPEG",
         "1 (undecodable image)", "import_report.json"),
    Case("non_utf8_caption", "import of a webdataset shard with a Latin-1 caption",
         "1 (caption not UTF-8)", "import_report.json"),
    Case("empty_caption", "import of a webdataset shard with a blank caption",
         "1 (empty caption)", "import_report.json"),
    Case("all_entries_broken", "import of a folder whose only image is broken",
         "no usable pairs", "must decode and have a non-empty UTF-8 caption"),
    Case("missing_manifest_image", "import of a JSONL manifest naming an absent image",
         "1 (missing image file)", "import_report.json"),
    Case("annotations_wrong_shape", "balance --config.annotations_dir=<shard with y of shape [N]>",
         "'y' has shape (128,) but must be [N, c]", "rewrite the shard"),
    Case("annotations_nan", "balance --config.annotations_dir=<shard with a NaN in y>",
         "'y' has 1 row(s) with NaN or inf values (first: row 3", "fix or drop those rows"),
    Case("pickled_annotation_shard", "balance --config.annotations_dir=<npz with an object array>",
         "holds pickled Python objects", "not trusted"),
    Case("pickled_big_vision_npz", "big_vision.load_npz(<npz with an object array>)",
         "holds pickled Python objects", "not trusted"),
    Case("targets_out_of_range", "balance --config.balance.pi=(1.5,-0.5)",
         "balance.pi=(1.5, -0.5) must list one target prevalence in [0, 1]", "(0.5, 0.5)"),
    Case("targets_not_summing_to_one", "balance --config.balance.pi=(0.7,0.6)",
         "sums to 1.300", "give targets that sum to 1"),
    Case("budget_out_of_range", "balance --config.balance.eta=1.5",
         "balance.eta=1.5 is the budget", "--config.balance.eta=0.65"),
    Case("infeasible_constraints", "balance --config.balance.eta=1.0 (keep everything)",
         "verdict: infeasible): binding rep[", "--config.balance.allow_infeasible=true"),
    Case("checkpoint_shape_mismatch", "resume a workdir trained with embed_dim=32 at embed_dim=16",
         "has params/img_head/kernel of shape (32, 32) but the config builds (32, 16)",
         "use a fresh --workdir, or the config it was trained with"),
    Case("truncated_checkpoint", "resume with a data file of checkpoints/2/state cut in half",
         "checkpoint step 2 in", "to resume from step 1, the previous checkpoint"),
    Case("tokenizer_not_sentencepiece", "train --config.tokenizer.path=<a text file>",
         "is not a valid SentencePiece model", "point tokenizer.path at a `.model` file"),
    Case("batch_not_divisible_by_devices", "train --config.batch_size=12 (8 devices)",
         "config.batch_size=12 is not divisible by the 8 devices", "(e.g. 8 or 16)"),
    Case("missing_config_file", "train --config nope.py",
         "config file 'nope.py' does not exist", "e.g. configs/siglip.py"),
    Case("config_without_get_config", "train --config <file without get_config>",
         "defines no get_config(arg)", "def get_config(arg=None)"),
    Case("malformed_duration", "train --config.total=10xx",
         "cannot read duration '10xx'", "use steps (300), examples ('5000ex')"),
    Case("unknown_loss", "train --config.loss=hinge",
         "config.loss='hinge' is not a loss", "('sigmoid', 'softmax')"),
    Case("unknown_nonfinite_policy", "train --config.nonfinite=ignore",
         "config.nonfinite='ignore'", "use one of ('stop', 'skip')"),
    Case("unknown_model_variant", "train --config.model.image.variant=XL/16",
         "model variant 'XL/16' is not known", "(e.g. 'B/16', 'mu/4')"),
    Case("unknown_evaluator_type", "train --config.evals.zeroshot.type=zeroshoot",
         "config.evals.zeroshot.type='zeroshoot' is not an evaluator type",
         "did you mean 'zeroshot'?"),
    Case("unknown_eval_split", "train --config <file setting evals.rb.split='valid'>",
         "needs split 'valid', which does not exist", "set its `split` to one of"),
    Case("mesh_not_device_count", "train --config.mesh.data=3 (8 devices)",
         "8 devices are not divisible by 3", "product is the device count (8)"),
    Case("missing_annotations_dir", "balance --config.annotations_dir=<absent folder>",
         "does not exist", "annotations_dir must be a folder of .npz or .parquet"),
    Case("big_vision_npz_missing_keys", "infer.load_two_tower(clip.npz=<npz with 2 arrays>)",
         "not a big_vision two-tower checkpoint: missing keys", "models.big_vision.save_npz"),
    Case("malformed_data_schedule", "train --config.data_version=baseline->balanced",
         "takes no '@WHEN'; every later one needs one", "'baseline->balanced@10%'"),
    Case("eval_without_checkpoint", "eval --workdir <folder with earlier results, no checkpoint>",
         "no complete checkpoint in", "train a model there first"),
]
CASE = {c.id: c for c in CASES}
SEEN: dict[str, str] = {}

# A tiny synthetic world, built once per module (see `world`).
TINY = ["--config.world.sizes.train=256", "--config.world.sizes.objects=40",
        "--config.world.sizes.people=40", "--config.world.sizes.retrieval=40",
        "--config.progress=false"]
N_TRAIN = 256


def _clear(case_id: str, message: str) -> None:
  """(a): the message names the problem and says the fix."""
  case = CASE[case_id]
  assert case.problem in message and case.fix in message, message
  assert "Traceback" not in message, message
  SEEN[case_id] = message.strip()


@pytest.fixture(scope="module", autouse=True)
def _log_messages():
  yield
  path = os.environ.get("BAD_INPUTS_LOG")
  if path:
    with open(path, "a") as f:
      for case in CASES:
        if case.id in SEEN:
          f.write(json.dumps({"case": case.id, "fed": case.fed,
                              "message": SEEN[case.id]}) + "\n")


def test_catalogue_has_one_test_per_case():
  assert len(CASES) >= 27 and len(CASE) == len(CASES)
  assert all(callable(globals().get(f"test_{c.id}")) for c in CASES)


# ------------------------------------------------------------------------------ helpers

def _snapshot(*roots) -> dict:
  """Every file and folder below roots: relative path -> (bytes, mtime_ns) (folders: None)."""
  out = {}
  for root in roots:
    for folder, dirs, files in os.walk(root):
      for d in dirs:
        out[os.path.join(folder, d)] = None
      for f in files:
        path = os.path.join(folder, f)
        with open(path, "rb") as fh:
          out[path] = (fh.read(), os.stat(path).st_mtime_ns)
  return out


def _earlier(path) -> str:
  """A workdir that already holds an earlier run's results."""
  os.makedirs(path, exist_ok=True)
  for name, text in (("config.json", '{"earlier": true}\n'), ("eval.json", '{"top1": 0.5}\n'),
                     ("metrics.jsonl", '{"step": 1, "loss": 2.0}\n'),
                     ("annotation_report.json", "{}\n")):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return str(path)


def _cli(capsys, command, *args, data_dir=None, workdir=None, code=1):
  """Runs `siglip-fair command` on the tiny world; (b) and (c): exits `code`, prints one
  error line, and leaves `workdir` (an earlier run's) unchanged. Returns stderr."""
  before = _snapshot(workdir)
  extra = [f"--config.data_dir={data_dir}"] if data_dir else []
  got = cli.main([command, "--workdir", workdir, *TINY, *extra, *args])
  err = capsys.readouterr().err
  assert got == code, err
  assert sum(line.startswith("siglip-fair") for line in err.splitlines()) == 1, err
  assert _snapshot(workdir) == before
  return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny world's data folder (built, with its tokenizer)."""
  data_dir = str(tmp_path_factory.mktemp("world"))
  prep = str(tmp_path_factory.mktemp("prep"))
  assert cli.main(["data", "--workdir", prep, *TINY, f"--config.data_dir={data_dir}"]) == 0
  return data_dir


@pytest.fixture
def run(tmp_path, world, capsys):
  """run(command, *overrides, code=...) on the tiny world in a workdir with earlier results."""
  workdir = _earlier(tmp_path / "run")
  return lambda command, *args, code=1: _cli(capsys, command, *args, data_dir=world,
                                             workdir=workdir, code=code)


# ------------------------------------------------------------------------ config errors

def test_unknown_config_key(run):
  _clear("unknown_config_key", run("train", "--config.optim.learning_rate=1", code=2))


def test_wrong_type(run):
  _clear("wrong_type", run("train", "--config.batch_size=big", code=2))


def test_zero_batch_size(run):
  _clear("zero_batch_size", run("train", "--config.batch_size=0"))


def test_zero_total_steps(run):
  _clear("zero_total_steps", run("train", "--config.total=0"))


def test_zero_mesh_axis(run):
  _clear("zero_mesh_axis", run("train", "--config.mesh.data=0"))


def test_negative_world_size(run, world):
  before = _snapshot(world)
  _clear("negative_world_size", run("train", "--config.world.sizes.train=-5"))
  assert _snapshot(world) == before


def test_negative_embed_dim(run):
  _clear("negative_embed_dim", run("train", "--config.model.embed_dim=-8"))


def test_missing_config_file(run):
  _clear("missing_config_file", run("train", "--config", "nope.py", code=2))


def test_config_without_get_config(run, tmp_path):
  path = tmp_path / "no_get_config.py"
  path.write_text("CONFIG = {'batch_size': 8}\n")
  _clear("config_without_get_config", run("train", "--config", str(path), code=2))


def test_malformed_duration(run):
  _clear("malformed_duration", run("train", "--config.total=10xx", code=2))


def test_unknown_loss(run):
  _clear("unknown_loss", run("train", "--config.loss=hinge"))


def test_unknown_nonfinite_policy(run):
  _clear("unknown_nonfinite_policy", run("train", "--config.nonfinite=ignore"))


def test_unknown_model_variant(run):
  _clear("unknown_model_variant", run("train", "--config.model.image.variant=XL/16"))


def test_unknown_evaluator_type(run):
  _clear("unknown_evaluator_type", run("train", "--config.evals.zeroshot.type=zeroshoot"))


def test_mesh_not_device_count(run):
  assert jax.device_count() == 8  # tests/conftest.py
  _clear("mesh_not_device_count", run("train", "--config.mesh.data=3"))


def test_batch_not_divisible_by_devices(run):
  _clear("batch_not_divisible_by_devices", run("train", "--config.batch_size=12"))


def test_malformed_data_schedule(run):
  _clear("malformed_data_schedule", run("train", "--config.data_version=baseline->balanced"))


def test_empty_split(run, world):
  before = _snapshot(world)
  _clear("empty_split", run("train", "--config.world.sizes.objects=0"))
  assert _snapshot(world) == before  # no world was started


def test_targets_out_of_range(run):
  _clear("targets_out_of_range", run("balance", "--config.balance.pi=(1.5,-0.5)"))


def test_budget_out_of_range(run):
  _clear("budget_out_of_range", run("balance", "--config.balance.eta=1.5"))


# ------------------------------------------------------------ errors that need the data

def test_unknown_eval_split(run, tmp_path):
  path = tmp_path / "valid_split.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {REPO!r})\n"
      "from configs import siglip\n\n\n"
      "def get_config(arg=None):\n"
      "  c = siglip.get_config(arg)\n"
      "  c.evals.rb.split = 'valid'\n"
      "  return c\n")
  _clear("unknown_eval_split", run("train", "--config", str(path)))


def test_unprepared_eval_dataset(run, tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()
  err = run("train", "--config.eval_data.ff.dataset=fairface",
            "--config.eval_data.ff.split=validation", f"--config.eval_data.ff.data_dir={empty}")
  _clear("unprepared_eval_dataset", err)
  assert not any(empty.iterdir())


def test_tokenizer_not_sentencepiece(run, tmp_path):
  path = tmp_path / "vocab.model"
  path.write_text("the\nof\nand\n")  # a word list, as some repos ship
  _clear("tokenizer_not_sentencepiece", run("train", f"--config.tokenizer.path={path}"))


def test_eval_without_checkpoint(run):
  _clear("eval_without_checkpoint", run("eval"))


def test_corrupted_arrayrecord_shard(tmp_path, world, capsys):
  data_dir = str(tmp_path / "data")
  shutil.copytree(world, data_dir)
  (shard,) = [os.path.join(f, n) for f, _, names in os.walk(data_dir) for n in names
              if n.startswith("synthetic_world-train.array_record")]
  with open(shard, "r+b") as f:  # a disk error in the middle of the file
    f.seek(os.path.getsize(shard) // 3)
    f.write(b"\x00garbage" * 64)
  before = _snapshot(data_dir)
  err = _cli(capsys, "train", data_dir=data_dir, workdir=_earlier(tmp_path / "run"))
  _clear("corrupted_arrayrecord_shard", err)
  assert _snapshot(data_dir) == before


# --------------------------------------------------------------------- M4 (balance) inputs

def _annotations(rng, n=N_TRAIN) -> dict:
  """Valid annotations of the tiny world's training split (2 groups, 10 labels)."""
  group = rng.integers(0, 2, n)
  label = rng.integers(0, 10, n)
  return dict(s=np.eye(2, dtype=np.float32)[group], known=np.ones(n, np.float32),
              y=np.eye(10, dtype=np.float32)[label], w=np.zeros((n, 10), np.float32),
              u=np.zeros(n, np.float32))


def test_annotations_wrong_shape(run, tmp_path):
  ann = _annotations(np.random.default_rng(0))
  ann["y"] = ann["y"].argmax(1).astype(np.float32)  # label indices instead of one-hot [N, c]
  shards.write_shards(ann, tmp_path / "ann", 2)
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("annotations_wrong_shape", err)
  assert "annotations-00000-of-00002.npz" in err


def test_annotations_nan(run, tmp_path):
  ann = _annotations(np.random.default_rng(1))
  ann["y"][3, 0] = np.nan
  shards.write_shards(ann, tmp_path / "ann", 2)
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("annotations_nan", err)
  assert "annotations-00000-of-00002.npz" in err


def test_pickled_annotation_shard(run, tmp_path):
  ann = _annotations(np.random.default_rng(2))
  (tmp_path / "ann").mkdir()
  np.savez(tmp_path / "ann" / "part-0.npz", **dict(ann, s=np.array(
      [{"group": int(g)} for g in ann["s"].argmax(1)], dtype=object)))
  err = run("balance", f"--config.annotations_dir={tmp_path / 'ann'}")
  _clear("pickled_annotation_shard", err)
  assert "part-0.npz" in err and "['s']" in err


def test_missing_annotations_dir(run, tmp_path):
  err = run("balance", f"--config.annotations_dir={tmp_path / 'absent'}")
  _clear("missing_annotations_dir", err)


def test_targets_not_summing_to_one(run):
  _clear("targets_not_summing_to_one", run("balance", "--config.balance.pi=(0.7,0.6)"))


def test_infeasible_constraints(run, tmp_path, world, capsys):
  # Keeping everything (η = 1) leaves the world's 30 % women as they are: the prevalence
  # targets (0.5, 0.5) cannot be met. The command refuses and writes nothing ...
  _clear("infeasible_constraints", run("balance", "--config.balance.eta=1.0"))
  # ... unless told to keep the infeasible result, which the card then names. A staging folder
  # that a killed run (SIGKILL: no clean-up) left behind goes at the same time.
  workdir = str(tmp_path / "allowed")
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  os.makedirs(os.path.join(workdir, f".tmp_balance.{cli._host()}.{dead.pid}.x1"))
  assert cli.main(["balance", "--workdir", workdir, *TINY, f"--config.data_dir={world}",
                   "--config.balance.eta=1.0", "--config.balance.allow_infeasible=true"]) == 0
  assert "verdict: infeasible" in capsys.readouterr().out
  with open(os.path.join(workdir, "balance", "card.json")) as f:
    card = json.load(f)
  assert card["verdict"] == "infeasible" and card["binding"][0].startswith("rep[")
  assert sorted(os.listdir(workdir)) == ["balance"]  # no staging folder left behind


# ------------------------------------------------------------------------ corpus imports

def _png(rng) -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(out, "PNG")
  return out.getvalue()


@pytest.fixture(scope="module")
def web_import(tmp_path_factory):
  """One webdataset shard with two good pairs, an undecodable image, a Latin-1 caption and a
  blank caption, imported through the importer's command line: (exit code, stdout, report,
  tfds folder)."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("web")
  members = {"good0.png": _png(rng), "good0.txt": b"a red square",
             "good1.png": _png(rng), "good1.txt": b"a blue square",
             "broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "broken.txt": b"a cat",
             "latin1.png": _png(rng), "latin1.txt": "un café".encode("latin-1"),
             "blank.png": _png(rng), "blank.txt": b"  \n\n"}
  shard = root / "00000.tar"
  with tarfile.open(shard, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  tfds_dir = root / "tfds"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = imports.main(["webdataset", str(shard), "--data_dir", str(tfds_dir), "--name",
                         "web_pairs", "--image_size", "16", "--workers", "1"])
  path = out.getvalue().strip().splitlines()[-1]
  with open(os.path.join(path, "import_report.json")) as f:
    report = json.load(f)
  return code, out.getvalue(), report, str(tfds_dir)


def _import_case(web_import, case_id, reason, key):
  code, printed, report, _ = web_import
  assert code == 0 and report["kept"] == 2  # broken entries are skipped, never fatal
  assert report["skipped"][reason] == 1 and report["examples"][reason] == [key]
  line = next(line for line in printed.splitlines() if line.startswith("import web_pairs"))
  _clear(case_id, line)


def test_undecodable_image(web_import):
  _import_case(web_import, "undecodable_image", "undecodable image", "00000.tar/broken")


def test_non_utf8_caption(web_import):
  _import_case(web_import, "non_utf8_caption", "caption not UTF-8", "00000.tar/latin1")


def test_empty_caption(web_import):
  _import_case(web_import, "empty_caption", "empty caption", "00000.tar/blank")


def test_all_entries_broken(web_import, tmp_path, capsys):
  _, _, _, tfds_dir = web_import  # holds the earlier import, web_pairs
  (tmp_path / "only.jpg").write_bytes(b"\xff\xd8 truncated")
  (tmp_path / "only.txt").write_text("a caption")
  before = _snapshot(tfds_dir)
  code = imports.main(["folder", str(tmp_path), "--data_dir", tfds_dir, "--name", "broken",
                       "--image_size", "16", "--workers", "1"])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if "error" in line]
  assert code == 1 and len(errors) == 1 and errors[0].startswith("import: error:"), err
  _clear("all_entries_broken", errors[0])
  assert _snapshot(tfds_dir) == before


def test_missing_manifest_image(web_import, tmp_path, capsys):
  _, _, _, tfds_dir = web_import
  rng = np.random.default_rng(3)
  (tmp_path / "a.png").write_bytes(_png(rng))
  (tmp_path / "m.jsonl").write_text(
      json.dumps({"image": "a.png", "caption": "a photo"}) + "\n"
      + json.dumps({"image": "gone.png", "caption": "a lost photo"}) + "\n")
  code = imports.main(["manifest", str(tmp_path / "m.jsonl"), "--data_dir", tfds_dir, "--name",
                       "manifest_pairs", "--image_size", "16", "--workers", "1"])
  printed = capsys.readouterr().out
  assert code == 0
  _clear("missing_manifest_image",
         next(line for line in printed.splitlines() if line.startswith("import manifest_pairs")))


def test_missing_manual_dir(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError) as error:
    faces.build("fairface", manual_dir=tmp_path / "fairface_download", data_dir=data_dir)
  _clear("missing_manual_dir", str(error.value))
  assert not data_dir.exists()  # nothing was started


# ------------------------------------------------------------------ checkpoints and npz

TOY = dict(seed=0, batch_size=16, total=4, warmup=0, log_every=1, ckpt_every=1, eval_every=4,
           keep_ckpts=2, loss="sigmoid", progress=False, tensorboard=False, mesh={"data": -1},
           model=dict(image=dict(variant="mu/4", pool="gap"),
                      text=dict(variant="mu", vocab_size=9, max_len=2, pool="last"),
                      embed_dim=32, t_init=10.0, b_init=-10.0),
           optim=dict(name="adamw", lr=1e-3, clip_norm=1.0))


def _toy_config(**model):
  cfg = ml_collections.ConfigDict(TOY)
  cfg.model.update(model)
  return cfg


def _toy_batch(i):
  rng = np.random.default_rng(i)
  return {"image": rng.normal(size=(16, 16, 3)).astype(np.float32),
          "text": np.array([int(rng.integers(1, 9)), 0], np.int32),
          "weight": np.float32(1.0)}


def _toy_iter():
  return iter(grain.MapDataset.range(10**6).map(_toy_batch).batch(16).to_iter_dataset())


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A workdir with complete checkpoints at steps 1 and 2 of the toy model (written directly,
  without compiling a train step)."""
  workdir = str(tmp_path_factory.mktemp("toy"))
  cfg = _toy_config()
  it = _toy_iter()
  position = it.get_state()
  example = next(it)
  it.set_state(position)
  tx, _ = make_optimizer(cfg.optim, cfg.total, 0)
  init = make_init_fn(make_model(cfg.model), tx, example["image"], example["text"])
  state = jax.jit(init)(jax.random.key_data(jax.random.key(0)))
  manager = checkpoint.make_manager(workdir)
  for step in (1, 2):
    checkpoint.save(manager, state.replace(step=np.int32(step)), it)
    manager.wait_until_finished()
  manager.close()
  return workdir


def _resume(workdir, **model):
  from siglip_fair.train.loop import train  # pylint: disable=g-import-not-at-top
  return train(_toy_config(**model), workdir, train_iter=_toy_iter())


def test_checkpoint_shape_mismatch(toy_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(toy_run, workdir)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError) as error:
    _resume(workdir, embed_dim=16)  # a smaller model on the same workdir
  _clear("checkpoint_shape_mismatch", str(error.value))
  assert _snapshot(workdir) == before


def test_truncated_checkpoint(toy_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(toy_run, workdir)
  step2 = os.path.join(workdir, "checkpoints", "2")
  data = [os.path.join(f, n) for f, _, names in os.walk(os.path.join(step2, "state"))
          for n in names if os.sep + "d" + os.sep in os.path.join(f, n)]
  largest = max(data, key=os.path.getsize)
  with open(largest, "r+b") as f:  # a copy that stopped half-way
    f.truncate(os.path.getsize(largest) // 2)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError) as error:
    _resume(workdir)
  _clear("truncated_checkpoint", str(error.value))
  assert f"delete {step2} " in str(error.value)
  assert _snapshot(workdir) == before
  shutil.rmtree(step2)  # what the message says to do: step 1 then loads
  assert jax.tree.leaves(checkpoint.load_params(workdir))


def test_pickled_big_vision_npz(tmp_path):
  path = tmp_path / "siglip.npz"
  np.savez(path, **{"params/t": np.zeros(1, np.float32),
                    "params/img/head/kernel": np.array([{"w": 1}], dtype=object)})
  with pytest.raises(ValueError) as error:
    big_vision.load_npz(path)
  _clear("pickled_big_vision_npz", str(error.value))


def test_big_vision_npz_missing_keys(tmp_path, world):
  npz = tmp_path / "image_only.npz"
  np.savez(npz, **{"params/img/embedding/kernel": np.zeros((4, 4, 3, 8), np.float32),
                   "params/t": np.zeros(1, np.float32)})
  (spm,) = [os.path.join(world, f) for f in os.listdir(world) if f.endswith(".model")]
  assert Tokenizer(spm, 8).vocab_size > 3  # a real tokenizer: only the npz is wrong
  cfg = ml_collections.ConfigDict(dict(kind="big_vision", npz=str(npz), tokenizer=spm,
                                       image_size=16))
  with pytest.raises(ValueError) as error:
    infer.load_two_tower(cfg, str(tmp_path))
  _clear("big_vision_npz_missing_keys", str(error.value))
  assert str(npz) in str(error.value)

