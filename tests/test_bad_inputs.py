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

The catalogue (one test per case, `test_<id>`) is bad_inputs.CASES; this file holds the config
and data cases, test_bad_inputs_m4.py the M4 (balance) inputs, test_bad_inputs_files.py the
corpus, checkpoint and big_vision file cases.
"""
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from siglip_fair import cli
from siglip_fair.data.tokenizer import Tokenizer
from siglip_fair.debias import infer

from bad_inputs import (CASE, CASES, REPO, TINY, _TAG, _clear, _cli, _earlier, _snapshot,
                        run, world, write_log)  # noqa: F401  (run, world: fixtures)



@pytest.fixture(scope="module", autouse=True)
def _log_messages():
  yield
  write_log()


def test_catalogue_has_one_test_per_case():
  import test_bad_inputs_files  # pylint: disable=g-import-not-at-top
  import test_bad_inputs_m4  # pylint: disable=g-import-not-at-top
  tests = {**vars(test_bad_inputs_files), **vars(test_bad_inputs_m4), **globals()}
  assert len(CASES) >= 27 and len(CASE) == len(CASES)
  assert all(callable(tests.get(f"test_{c.id}")) for c in CASES)


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
              if n.startswith("synthetic_world-train.array_record")
              and _TAG[world] in f]
  with open(shard, "r+b") as f:  # a disk error in the middle of the file
    f.seek(os.path.getsize(shard) // 3)
    f.write(b"\x00garbage" * 64)
  before = _snapshot(data_dir)
  err = _cli(capsys, "train", data_dir=data_dir, workdir=_earlier(tmp_path / "run"))
  _clear("corrupted_arrayrecord_shard", err)
  assert _snapshot(data_dir) == before


def test_big_vision_npz_missing_keys(tmp_path, world):
  npz = tmp_path / "image_only.npz"
  np.savez(npz, **{"params/img/embedding/kernel": np.zeros((4, 4, 3, 8), np.float32),
                   "params/t": np.zeros(1, np.float32)})
  (spm,) = [os.path.join(world, f) for f in os.listdir(world)
            if f.endswith(".model") and _TAG[world] in f]
  assert Tokenizer(spm, 8).vocab_size > 3  # a real tokenizer: only the npz is wrong
  cfg = ml_collections.ConfigDict(dict(kind="big_vision", npz=str(npz), tokenizer=spm,
                                       image_size=16))
  with pytest.raises(ValueError) as error:
    infer.load_two_tower(cfg, str(tmp_path))
  _clear("big_vision_npz_missing_keys", str(error.value))
  assert str(npz) in str(error.value)



# --------------------------------------------- checks that once ran only after work was done

@pytest.fixture
def before_work(tmp_path, capsys):
  """before_work(case, *overrides, command='train', code=1): the command fails with the case's
  message before anything is built or written: a fresh data folder stays empty and the
  workdir (an earlier run's) unchanged."""
  def check(case, *args, command="train", code=1):
    data_dir = tmp_path / "fresh_data"
    data_dir.mkdir(exist_ok=True)
    err = _cli(capsys, command, *args, data_dir=str(data_dir),
               workdir=_earlier(tmp_path / "run"), code=code)
    assert not os.listdir(data_dir), os.listdir(data_dir)  # no world, no tokenizer
    _clear(case, err)
  return check


def test_unknown_loss_impl(before_work):
  before_work("unknown_loss_impl", "--config.loss_impl=ringg")


def test_unknown_model_dtype(before_work):
  before_work("unknown_model_dtype", "--config.model.dtype=fp8")


def test_unknown_model_head(before_work):
  before_work("unknown_model_head", "--config.model.head=deep")


def test_unknown_image_pool(before_work):
  before_work("unknown_image_pool", "--config.model.image.pool=max")


def test_image_size_not_divisible_by_patch(before_work):
  before_work("image_size_not_divisible_by_patch", "--config.world.image_size=30")


def test_tokenizer_vocab_too_small(before_work):
  before_work("tokenizer_vocab_too_small", "--config.tokenizer.vocab_size=5")


def test_tokenizer_vocab_bound_is_sentencepiece_s(tmp_path):
  """The bound the check uses is SentencePiece's own: it trains at the bound on captions that
  use the whole alphabet, and refuses one piece less."""
  from siglip_fair.config.checks import TOKENIZER_SPECIALS
  from siglip_fair.data import world
  from siglip_fair.data.tokenizer import train_sentencepiece
  alphabet = "".join(sorted(world.caption_alphabet()))
  texts = [alphabet] * 50 + ["a photo of a man", "a woman's car"] * 50
  need = len(world.caption_alphabet()) + TOKENIZER_SPECIALS
  train_sentencepiece(texts, need, str(tmp_path / "ok.model"))
  with pytest.raises(RuntimeError, match="smaller than required_chars"):
    train_sentencepiece(texts, need - 1, str(tmp_path / "small.model"))


def test_caption_alphabet_covers_every_caption():
  from siglip_fair.data import world
  alphabet = world.caption_alphabet()
  for seed in range(5):
    cfg = world.default_config()
    cfg.seed = seed
    cfg.image_size = 16
    for split in world.SPLITS:
      ex = world.generate_split(cfg, split, 0, 300)
      used = set("".join(c.decode() for c in ex["captions"].reshape(-1)))
      assert used <= alphabet, (seed, split, used - alphabet)


def test_config_syntax_error(run, tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None)\n  return None\n")
  err = run("train", "--config", str(path), code=2)
  _clear("config_syntax_error", err)
  assert str(path) in err


def test_workdir_is_a_file(tmp_path, world, capsys):
  path = tmp_path / "not_a_folder"
  path.write_text("notes\n")
  code = cli.main(["train", "--workdir", str(path), *TINY, f"--config.data_dir={world}"])
  err = capsys.readouterr().err
  assert code == 2 and path.read_text() == "notes\n", err
  _clear("workdir_is_a_file", err)


def test_workdir_read_only(tmp_path, world, capsys, monkeypatch):
  from siglip_fair import workdir as workdir_lib
  workdir = _earlier(tmp_path / "run")
  before = _snapshot(workdir)
  if os.geteuid() == 0:  # root writes anywhere: make the probe fail as a read-only mount would
    monkeypatch.setattr(workdir_lib, "_write_error",
                        lambda folder: OSError(30, "Read-only file system"))
  else:
    os.chmod(workdir, 0o555)
  try:
    code = cli.main(["train", "--workdir", workdir, *TINY, f"--config.data_dir={world}"])
  finally:
    os.chmod(workdir, 0o755)
  err = capsys.readouterr().err
  assert code == 2, err
  _clear("workdir_read_only", err)
  assert _snapshot(workdir) == before


def test_workdir_in_use(tmp_path, world, capsys):
  workdir = _earlier(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom siglip_fair import workdir\n"
       f"with workdir.lock({workdir!r}, 'siglip-fair train'):\n"
       "  print('locked', flush=True)\n  time.sleep(600)\n"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(workdir)
    code = cli.main(["train", "--workdir", workdir, *TINY, f"--config.data_dir={world}"])
    err = capsys.readouterr().err
    assert code == 2, err
    _clear("workdir_in_use", err)
    assert f"pid {holder.pid}" in err
    assert _snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()


def test_unknown_debias_task(tmp_path, capsys):
  workdir = _earlier(tmp_path / "run")
  before = _snapshot(workdir)
  assert cli.main(["debias", "--workdir", workdir, "--config.task.name=mnist"]) == 2
  _clear("unknown_debias_task", capsys.readouterr().err)
  assert _snapshot(workdir) == before


def test_eval_changes_training_field(tmp_path, capsys):
  from siglip_fair.train import checkpoint
  workdir = _earlier(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))  # a run (only eval_config reads it)
  before = _snapshot(workdir)
  original = checkpoint.latest_step
  checkpoint.latest_step = lambda w: 4
  try:
    assert cli.main(["eval", "--workdir", workdir, "--config.total=5"]) == 2
  finally:
    checkpoint.latest_step = original
  _clear("eval_changes_training_field", capsys.readouterr().err)
  assert _snapshot(workdir) == before
