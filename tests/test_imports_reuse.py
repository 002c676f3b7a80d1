"""Re-importing under one name: the same inputs reuse the dataset, other or changed inputs
rebuild it, and a failed rebuild leaves the old one (import_fingerprint.json)."""
import json
import os

import numpy as np
import PIL.Image
import pytest

from siglip_fair.data import imports

SIZE = 16


def _folder(root, captions, seed):
  """A folder of 8x8 PNGs, one per caption, each with its caption file."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for i, caption in enumerate(captions):
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text(caption + "\n")
  return str(root)


def _import(folder, data_dir, capsys):
  """(path, captions read back, the import's `import:` lines)."""
  path = imports.import_pairs("folder", folder, data_dir, name="pairs", image_size=SIZE,
                              num_workers=1)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("import:")]
  return path, sorted(c.decode() for c in imports.read_captions(path)[:, 0]), lines


def _mtimes(folder):
  return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


def test_reimport_rebuilds_changed_inputs_and_reuses_same_ones(tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  a = _folder(tmp_path / "a", ["apple", "apricot"], seed=0)
  b = _folder(tmp_path / "b", ["banana", "blueberry", "bilberry"], seed=1)

  path, captions, lines = _import(a, data_dir, capsys)
  assert captions == ["apple", "apricot"] and lines == []  # nothing there to reuse or replace

  # Other inputs under the same name: B's data, and a line that says why.
  path_b, captions, lines = _import(b, data_dir, capsys)
  assert captions == ["banana", "bilberry", "blueberry"] and path_b == path
  assert len(lines) == 1 and lines[0].endswith("; rebuilding"), lines
  assert f"since {path} was built" in lines[0] and f"added {os.path.abspath(b)}" in lines[0]
  assert f"removed {os.path.abspath(a)}" in lines[0]
  fingerprint = json.load(open(f"{path}/import_fingerprint.json"))
  assert fingerprint == imports.fingerprint("folder", [b], SIZE, skip=data_dir)
  assert fingerprint["format"] == imports.FORMAT_VERSION
  assert [i["files"] for i in fingerprint["inputs"]] == [6]
  assert not [f for f in os.listdir(data_dir) if f != "pairs"]  # no staging left behind

  # The same inputs, untouched: reused, the dataset's files not rewritten.
  before = _mtimes(b), _mtimes(path)
  _, captions, lines = _import(b, data_dir, capsys)
  assert captions == ["banana", "bilberry", "blueberry"]
  assert lines == [f"import: reusing {path} (same inputs)"]
  assert (_mtimes(b), _mtimes(path)) == before

  # One caption file rewritten: rebuilt with it.
  (tmp_path / "b" / "1.txt").write_text("blackberry\n")
  _, captions, lines = _import(b, data_dir, capsys)
  assert captions == ["banana", "bilberry", "blackberry"]
  assert len(lines) == 1 and f"(changed {os.path.abspath(b)})" in lines[0], lines

  # Only an mtime moved (same bytes): rebuilt too; the check does not read contents.
  st = os.stat(tmp_path / "b" / "0.png")
  os.utime(tmp_path / "b" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _, _, lines = _import(b, data_dir, capsys)
  assert len(lines) == 1 and lines[0].endswith("rebuilding"), lines

  # Another image size is another dataset.
  imports.import_pairs("folder", b, data_dir, name="pairs", image_size=8, num_workers=1)
  assert "image_size 16 -> 8" in capsys.readouterr().out
  assert imports.image_size(path) == 8


def test_failed_reimport_keeps_the_old_dataset(tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  good = _folder(tmp_path / "good", ["kept caption"], seed=2)
  path, _, _ = _import(good, data_dir, capsys)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
  (tmp_path / "broken" / "x.txt").write_text("a caption")
  with pytest.raises(ValueError, match="no usable pairs"):
    imports.import_pairs("folder", str(tmp_path / "broken"), data_dir, name="pairs",
                         image_size=SIZE, num_workers=1)
  assert "rebuilding" in capsys.readouterr().out
  assert [c.decode() for c in imports.read_captions(path)[:, 0]] == ["kept caption"]
  assert not [f for f in os.listdir(data_dir) if f != "pairs"]  # no staging left behind
  # The old dataset's fingerprint still names its own inputs, so it is reused as before.
  _, _, lines = _import(good, data_dir, capsys)
  assert lines == [f"import: reusing {path} (same inputs)"]


def test_manifest_fingerprint_covers_the_images_it_names(tmp_path):
  PIL.Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
  (tmp_path / "m.jsonl").write_text(json.dumps({"image": "0.png", "caption": "c"}) + "\n")
  manifest = str(tmp_path / "m.jsonl")
  first = imports.fingerprint("manifest", [manifest], SIZE)
  assert first == imports.fingerprint("manifest", [manifest], SIZE)
  # Another size, as mtimes can repeat within a clock tick; the manifest itself is unchanged.
  PIL.Image.new("RGB", (16, 16)).save(tmp_path / "0.png")
  assert imports.fingerprint("manifest", [manifest], SIZE) != first


def test_folder_fingerprint_skips_the_data_dir_inside_it(tmp_path):
  """`folder . --data_dir tfds` must not see its own output as changed input."""
  folder = _folder(tmp_path / "photos", ["one"], seed=3)
  data_dir = tmp_path / "photos" / "tfds"
  first = imports.fingerprint("folder", [folder], SIZE, skip=str(data_dir))
  (data_dir / "pairs").mkdir(parents=True)
  (data_dir / "pairs" / "written.json").write_text("{}")
  assert imports.fingerprint("folder", [folder], SIZE, skip=str(data_dir)) == first
  assert imports.fingerprint("folder", [folder], SIZE) != first


def test_reimported_training_corpus_is_new_training_data(tmp_path, capsys):
  """A corpus re-imported with other pairs is other training data for every later stage: its
  identity (which the balance and run fingerprints hold) and its tokenizer's name change."""
  from siglip_fair import config as cfglib, study  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  path, _, _ = _import(_folder(tmp_path / "a", ["apple", "apricot"], seed=0), data_dir, capsys)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = cfglib.get_config(os.path.join(repo, "configs", "siglip.py"))
  cfg.train_data = path
  first = study.train_data_identity(cfg)
  assert study.train_data_identity(cfg) == first  # stable while the corpus is
  _import(_folder(tmp_path / "b", ["banana", "blueberry"], seed=1), data_dir, capsys)
  second = study.train_data_identity(cfg)
  assert second != first and second["import"] == first["import"]
