"""CLIP-debias end to end: the `debias` subcommand on coloured digits with a two-tower model
trained here on the synthetic world, pseudo groups against independent computations, and the
CelebA and UTKFace paths on mock / tiny data."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import debias as debias_config
from siglip_fair import cli
from siglip_fair.debias import infer, run, sensitivity, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = ["--config.clip.config.world.sizes.train=800", "--config.clip.config.batch_size=32",
        "--config.clip.config.eval_every=100%"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A two-tower run on the synthetic world, trained by the debias command itself."""
  return str(tmp_path_factory.mktemp("clip"))


def _config(arg, clip_dir, **overrides):
  c = debias_config.get_config(arg + ",clip_steps=60")
  c.clip.workdir = clip_dir
  c.clip.config.world.sizes.train = 800
  c.clip.config.batch_size = 32
  c.clip.config.eval_every = "100%"
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_debias_command_on_digits_trains_the_two_tower_and_every_method(clip_dir, tmp_path):
  # The README's command as written (in a fresh folder), on tiny settings: 2 seeds, 20 target
  # steps, a 60-step two-tower model.
  from doc_commands import readme_commands  # pylint: disable=g-import-not-at-top
  (readme,) = [c for c in readme_commands() if c.subcommand == "debias"
               and c.config == "configs/debias.py:task=digits"]
  workdir = str(tmp_path / readme.argv[readme.argv.index("--workdir") + 1])
  argv = [os.path.join(REPO, w) if w.startswith("configs/") else w for w in readme.argv[3:]]
  argv = [workdir if w == readme.argv[readme.argv.index("--workdir") + 1] else w for w in argv]
  argv += ["--config.seeds=(0, 1)", "--config.target.steps=20",
           "--config.target.jtt_first_steps=6", "--config.clip.config.total=60",
           f"--config.clip.workdir={clip_dir}", *CLIP, "--config.target.eval_every=10"]
  assert cli.main(argv) == 0
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["methods"] == list(debias_config.ALL_METHODS)
  # The table is the mean and (ddof=1) std over the per-run files.
  runs = [json.load(open(os.path.join(root, f))) for root, _, files in
          os.walk(os.path.join(workdir, "runs")) for f in files]
  assert len(runs) == 2 * len(debias_config.ALL_METHODS)
  for method, row in results["summary"].items():
    v = np.array([r["test"]["worst_group_accuracy"] for r in runs if r["method"] == method])
    assert row["worst_group_accuracy"][:2] == pytest.approx([v.mean(), v.std(ddof=1)])
  # Every model was selected at one of its validation points.
  assert all(r["selected_step"] in (10, 20) for r in runs)
  q = results["pseudo_groups"]
  assert 0.0 <= q["purity"] <= 1.0 and -1.0 <= q["ari"] <= 1.0
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| clip_debias |" in md and "worst group" in md
  assert open(os.path.join(workdir, "results.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  # A rerun reuses the similarities and every finished training.
  stamps = {f: os.path.getmtime(os.path.join(workdir, "runs", d, f))
            for d in os.listdir(os.path.join(workdir, "runs"))
            for f in os.listdir(os.path.join(workdir, "runs", d))}
  assert cli.main(argv) == 0
  for d in os.listdir(os.path.join(workdir, "runs")):
    for f in os.listdir(os.path.join(workdir, "runs", d)):
      assert os.path.getmtime(os.path.join(workdir, "runs", d, f)) == stamps[f]


def test_pseudo_groups_recover_planted_clusters_and_cross_with_labels():
  config = debias_config.get_config("task=digits")
  task = tasks.load_task(config.task)
  rng = np.random.default_rng(0)
  # Similarities that put each colour at its own corner, plus noise.
  sims = {s: (np.eye(2)[a["sensitive"]] + 0.05 * rng.standard_normal((len(a["label"]), 2))
              ).astype(np.float32) for s, a in task.splits.items()}
  groups, quality = run.pseudo_groups(config, task, sims)
  assert quality["ari"] == pytest.approx(1.0) and quality["purity"] == pytest.approx(1.0)
  for split, a in task.splits.items():
    cluster = groups[split] % 2
    # One cluster per colour (up to renaming), the same renaming in every split.
    flip = cluster[0] != a["sensitive"][0]
    np.testing.assert_array_equal(cluster, a["sensitive"] ^ flip)
    np.testing.assert_array_equal(groups[split] // 2, a["label"])


def test_sensitivity_table_on_digits(clip_dir, tmp_path):
  config = _config("task=digits,seeds=1,steps=20", clip_dir)
  config.sensitivity.update(dict(prompt_sets=("colour", "colour_words"), k=(2, 3),
                                 refresh_every=(5,), tau=(1.0,)))
  config.target.eval_every = "10"
  table = sensitivity.run(config, str(tmp_path))
  assert [(r["factor"], r["value"]) for r in table["rows"]] == [
      ("prompt_sets", "colour"), ("prompt_sets", "colour_words"), ("k", 2), ("k", 3),
      ("refresh_every", 5), ("tau", "1.0")]
  # Rows that change only the trainer share the default pseudo groups' ARI.
  ari = {(r["factor"], r["value"]): r["ari"] for r in table["rows"]}
  assert ari[("refresh_every", 5)] == ari[("tau", "1.0")] == ari[("prompt_sets", "colour")]
  md = open(tmp_path / "sensitivity.md").read()
  assert "| k | 3 |" in md
  assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def _handle(clip_dir):
  config = debias_config.get_config("clip_steps=60")
  config.clip.workdir = clip_dir
  config.clip.config.world.sizes.train = 800
  return infer.load_two_tower(config.clip, clip_dir)


def test_celeb_a_path_under_mock_data(clip_dir, tmp_path):
  handle = _handle(clip_dir)  # outside the mock: it reads the world's files
  config = _config("task=celeb_a,seeds=1,steps=10", clip_dir)
  config.methods = ("erm", "clip_debias", "oracle_balanced")
  config.task.image_size = 16
  config.target.eval_every = "5"
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    results = run.run(config, str(tmp_path), get_handle=lambda: handle)
  assert results["task"] == "celeb_a" and set(results["summary"]) == set(config.methods)
  assert "worst_group_accuracy" in results["summary"]["oracle_balanced"]


def test_utkface_path_on_tiny_files(clip_dir, tmp_path):
  import PIL.Image
  from siglip_fair.data import faces
  rng = np.random.default_rng(0)
  manual = tmp_path / "utk" / "UTKFace"
  manual.mkdir(parents=True)
  for i in range(40):
    age, gender, race = int(rng.integers(1, 90)), i % 2, (i // 2) % 5
    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(manual / f"{age}_{gender}_{race}_2017{i:04d}.jpg")
  data_dir = tmp_path / "tfds"
  faces.build("utkface", tmp_path / "utk", data_dir)
  config = _config("task=utkface,seeds=1,steps=10", clip_dir)
  config.methods = ("erm", "clip_debias", "jtt", "oracle_group_dro")
  config.task.update(dict(data_dir=str(data_dir), image_size=16))
  config.target.update(dict(eval_every="5", jtt_first_steps=5))
  results = run.run(config, str(tmp_path / "work"), get_handle=lambda: _handle(clip_dir))
  sizes = {s: len(a["label"]) for s, a in tasks.load_task(config.task).splits.items()}
  assert sizes == {"test": 8, "val": 6, "train": 26}
  assert set(results["summary"]) == set(config.methods)
  # k defaults to the number of race values.
  assert results["pseudo_groups"]["purity"] >= 0.2


def test_big_vision_checkpoint_gives_the_same_similarities_as_the_run(clip_dir, tmp_path):
  from siglip_fair.models import big_vision
  handle = _handle(clip_dir)
  npz = big_vision.save_npz(tmp_path / "clip.npz", handle.params)
  config = debias_config.get_config("task=digits")
  config.clip.update(dict(kind="big_vision", npz=str(npz), tokenizer=handle.tokenizer.model_path,
                          image_size=32, eos="sticky", text_padding="mask"))
  imported = infer.load_two_tower(config.clip, str(tmp_path))
  images = tasks.coloured_digits("test", size=16)["image"][:40]
  attrs = {"red": ["red"], "blue": ["blue", "a blue object"]}
  ours = infer.similarities(handle, images, attrs, ["a photo of {}"], 16)
  theirs = infer.similarities(imported, images, attrs, ["a photo of {}"], 16)
  np.testing.assert_allclose(theirs, ours, atol=2e-5)
  config.clip.npz = str(tmp_path / "absent.npz")
  with pytest.raises(FileNotFoundError, match="clip.npz"):
    infer.load_two_tower(config.clip, str(tmp_path))
