"""Importing image–text pairs from a folder, a JSONL manifest and a webdataset shard, each with
broken entries, into datasets the training pipeline reads; the README's commands run as
`python -m`; truncated shards. Re-importing under one name: test_imports_reuse.py."""
import glob
import io
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest

from siglip_fair.data import imports, pipeline

SIZE = 16


def _jpeg(rng, h=20, w=28):
  # Smooth images: JPEG keeps them within a few levels (pixel noise it would not).
  coarse = PIL.Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
  pixels = np.asarray(coarse.resize((w, h), PIL.Image.Resampling.BILINEAR))
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format="PNG")  # lossless source
  return buffer.getvalue(), pixels


def _expected(pixels):
  """Centre crop and bicubic resize, done here with PIL directly."""
  h, w = pixels.shape[:2]
  s = min(h, w)
  crop = pixels[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return np.asarray(PIL.Image.fromarray(crop).resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC),
                    np.float32)


class CharTokenizer:
  def encode(self, texts):
    out = np.zeros((len(texts), 8), np.int32)
    for row, t in zip(out, texts):
      ids = list(t if isinstance(t, bytes) else t.encode())[:8]
      row[:len(ids)] = ids
    return out


def _check(path, expected, report_skipped):
  report = json.load(open(f"{path}/import_report.json"))
  assert report["kept"] == len(expected) and report["skipped"] == report_skipped
  source = imports.data_source(path)
  assert len(source) == len(expected)
  by_key = {}
  for i in range(len(source)):
    r = source[i]
    by_key[r["key"].decode() if isinstance(r["key"], bytes) else r["key"]] = r
  assert set(by_key) == set(expected)
  for key, (pixels, captions) in expected.items():
    r = by_key[key]
    assert r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8
    got = r["image"].astype(np.float32)
    err = np.abs(got - _expected(pixels)).mean()
    # JPEG's chroma subsampling costs a few levels at 16x16; resizing without the centre crop
    # would cost several times more.
    uncropped = np.asarray(PIL.Image.fromarray(pixels).resize((SIZE, SIZE),
                                                             PIL.Image.Resampling.BICUBIC))
    assert err < 8 and err < 0.5 * np.abs(got - uncropped).mean()
    assert [c.decode() if isinstance(c, bytes) else c for c in r["captions"]] == captions
  batch = next(iter(pipeline.train_dataset(source, tokenizer=CharTokenizer(),
                                           global_batch_size=2, seed=0)))
  assert batch["image"].shape == (2, SIZE, SIZE, 3) and batch["text"].shape == (2, 8)


def test_folder_with_broken_entries(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "folder"
  (root / "sub").mkdir(parents=True)
  expected = {}
  for i, name in enumerate(["a.png", "sub/b.png", "c.png"]):
    data, pixels = _jpeg(rng)
    (root / name).write_bytes(data)
    (root / name).with_suffix(".txt").write_text(f"a photo {i}\n\nsecond caption {i}\n")
    expected[name] = (pixels, [f"a photo {i}", f"second caption {i}"])
  (root / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
  (root / "broken.txt").write_text("x")
  (root / "nocaption.png").write_bytes(_jpeg(rng)[0])
  (root / "empty.png").write_bytes(_jpeg(rng)[0])
  (root / "empty.txt").write_text("  \n")
  (root / "latin1.png").write_bytes(_jpeg(rng)[0])
  (root / "latin1.txt").write_bytes("café".encode("latin-1"))
  path = imports.import_pairs("folder", str(root), str(tmp_path / "tfds"), name="folder_pairs",
                              image_size=SIZE, num_workers=2)
  _check(path, expected, {"undecodable image": 1, "empty caption": 1, "no caption file": 1,
                          "caption not UTF-8": 1})


def test_jsonl_manifest_with_bad_rows(tmp_path):
  rng = np.random.default_rng(1)
  lines, expected = [], {}
  for i in range(3):
    data, pixels = _jpeg(rng)
    (tmp_path / f"{i}.png").write_bytes(data)
    lines.append(json.dumps({"image": f"{i}.png", "caption": f"cap {i}"}))
    expected[f"m.jsonl:{len(lines)}"] = (pixels, [f"cap {i}"])
  lines += ["{not json", json.dumps({"image": "missing.png", "caption": "x"}),
            json.dumps({"caption": "no image"})]
  (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
  path = imports.import_pairs("manifest", str(tmp_path / "m.jsonl"), str(tmp_path / "tfds"),
                              name="jsonl_pairs", image_size=SIZE, num_workers=1)
  _check(path, expected, {"row does not parse": 2, "missing image file": 1})


def test_webdataset_shard_with_corrupt_members(tmp_path):
  rng = np.random.default_rng(2)
  shard = tmp_path / "00000.tar"
  expected = {}
  with tarfile.open(shard, "w") as tar:
    def add(name, data):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    for i in range(3):
      data, pixels = _jpeg(rng)
      add(f"00000000{i}.jpg", data)
      if i == 2:  # caption only in the json, as img2dataset can write it
        add(f"00000000{i}.json", json.dumps({"caption": "from json"}).encode())
        expected[f"00000.tar/00000000{i}"] = (pixels, ["from json"])
      else:
        add(f"00000000{i}.txt", f"web caption {i}".encode())
        expected[f"00000.tar/00000000{i}"] = (pixels, [f"web caption {i}"])
    add("000000009.jpg", b"corrupt")
    add("000000009.txt", b"fine caption")
    add("000000010.jpg", _jpeg(rng)[0])  # no caption at all
  path = imports.import_pairs("webdataset", [str(shard)], str(tmp_path / "tfds"),
                              name="web_pairs", image_size=SIZE, num_workers=2)
  _check(path, expected, {"undecodable image": 1, "no caption": 1})


def test_bad_calls_are_named(tmp_path):
  with pytest.raises(ValueError, match="kind='parquet'"):
    imports.import_pairs("parquet", str(tmp_path), str(tmp_path), name="x")
  with pytest.raises(FileNotFoundError, match="absent"):
    imports.import_pairs("folder", str(tmp_path / "absent"), str(tmp_path), name="x")
  (tmp_path / "only.png").write_bytes(b"junk")
  (tmp_path / "only.txt").write_text("caption")
  with pytest.raises(ValueError, match="no usable pairs"):
    imports.import_pairs("folder", str(tmp_path), str(tmp_path / "tfds"), name="nothing",
                         image_size=SIZE, num_workers=1)
  left = list((tmp_path / "tfds").rglob("*"))
  assert not any(p.name == "1.0.0" or "incomplete" in p.name for p in left), left


# ------------------------------------------------------------------ the README's commands

README = pathlib.Path(__file__).parent.parent / "README.md"


def _png(rng, side=8) -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
  return out.getvalue()


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_readme_commands_run_as_a_module(tmp_path):
  """Each documented `python -m siglip_fair.data.imports` line, verbatim apart from the size and
  worker flags, in a folder holding the files it names, with HOME there so ~/tfds is too."""
  commands = [shlex.split(line) for line in README.read_text().splitlines()
              if line.startswith("python -m siglip_fair.data.imports ")]
  assert sorted(c[3] for c in commands) == ["folder", "manifest", "webdataset"], commands
  rng = np.random.default_rng(5)
  (tmp_path / "photos" / "sub").mkdir(parents=True)
  (tmp_path / "shards").mkdir()
  captions = {"folder": [], "manifest": [], "webdataset": []}
  for i, name in enumerate(["a.png", "sub/b.jpg"]):
    image = PIL.Image.open(io.BytesIO(_png(rng)))
    image.save(tmp_path / "photos" / name)  # the suffix picks PNG or JPEG
    (tmp_path / "photos" / name).with_suffix(".txt").write_text(f"photo {i}\n")
    captions["folder"].append(f"photo {i}")
  lines = []
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(_png(rng))
    lines.append(json.dumps({"image": f"{i}.png", "caption": f"listed {i}"}))
    captions["manifest"].append(f"listed {i}")
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  for shard in range(2):
    members = []
    for i in range(2):
      members += [(f"{shard}{i:05d}.png", _png(rng)), (f"{shard}{i:05d}.txt", b"web %d" % i)]
      captions["webdataset"].append(f"web {i}")
    _write_tar(tmp_path / "shards" / f"{shard:05d}.tar", members)
  env = dict(os.environ, HOME=str(tmp_path))
  for command in commands:
    kind = command[3]
    argv = [a for pattern in command[4:] for a in (
        sorted(glob.glob(pattern, root_dir=tmp_path)) if "*" in pattern else [pattern])]
    # The timeout only guards against a hang (spawned workers re-running the command).
    done = subprocess.run([sys.executable, *command[1:4], *argv, "--image_size", "16",
                           "--workers", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, (command, done.stderr[-3000:])
    path = done.stdout.strip().splitlines()[-1]
    assert os.path.realpath(path).startswith(os.path.realpath(tmp_path / "tfds")), path
    assert len(imports.data_source(path)) == len(captions[kind])
    got = imports.read_captions(path)
    assert sorted(c.decode() for c in got[:, 0]) == sorted(captions[kind]), kind
    assert f"kept {len(captions[kind])}, skipped none" in done.stdout


# ------------------------------------------------------------------------ truncated shards

@pytest.mark.parametrize("cut_at", ["inside_image_header", "inside_image_data",
                                    "inside_caption_header", "between_members"])
def test_truncated_shard_is_counted(tmp_path, capsys, cut_at):
  rng = np.random.default_rng(6)
  shard = tmp_path / "00000.tar"
  _write_tar(shard, [m for i in range(120) for m in ((f"{i:06d}.png", _png(rng)),
                                                      (f"{i:06d}.txt", b"caption %d" % i))])
  with tarfile.open(shard) as tar:
    members = tar.getmembers()
  image, caption = members[120:122]  # pair 60's
  cut = {"inside_image_header": image.offset + 100,  # pair 60 unseen: the old "skipped none"
         "inside_image_data": image.offset_data + image.size // 2,
         "inside_caption_header": caption.offset + 100,
         "between_members": caption.offset}[cut_at]
  shard.write_bytes(shard.read_bytes()[:cut])
  # Pairs with at least one member header wholly before the cut; pair 60's is cut short.
  seen = {m.name.split(".")[0] for m in members if m.offset + tarfile.BLOCKSIZE <= cut}
  cut_pairs = len(seen) - 60
  assert cut_pairs == (0 if cut_at == "inside_image_header" else 1)
  path = imports.import_pairs("webdataset", [str(shard)], str(tmp_path / "tfds"),
                              name="cut_pairs", image_size=SIZE, num_workers=1)
  printed = capsys.readouterr().out
  report = json.load(open(f"{path}/import_report.json"))
  unreadable = [r for r in report["skipped"] if r.startswith("unreadable tar: ")]
  assert len(unreadable) == 1 and report["skipped"][unreadable[0]] == 1, report
  assert report["examples"][unreadable[0]] == ["00000.tar"]  # the unknown rest of the shard
  assert report["skipped"].get("truncated tar member", 0) == cut_pairs, report
  if cut_pairs:
    assert report["examples"]["truncated tar member"] == ["00000.tar/000060"]
  assert report["kept"] == 60 and len(imports.data_source(path)) == 60
  pairs_skipped = sum(report["skipped"].values()) - 1
  assert report["kept"] + pairs_skipped == len(seen), report
  summary = next(line for line in printed.splitlines() if line.startswith("import cut_pairs:"))
  assert "1 (unreadable tar: " in summary and "import_report.json" in summary, summary
  assert ("1 (truncated tar member)" in summary) == bool(cut_pairs), summary
