"""Bad-input catalogue, part 2 (bad_inputs.py holds the cases): broken corpora fed to the
importer, and damaged checkpoints and big_vision files fed to the library."""
import contextlib
import io
import json
import os
import shutil
import tarfile

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from siglip_fair.data import faces, imports
from siglip_fair.models import big_vision, make_model
from siglip_fair.train import checkpoint
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.state import make_init_fn

from bad_inputs import _clear, _snapshot, write_log


@pytest.fixture(scope="module", autouse=True)
def _log_messages():
  yield
  write_log()


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
