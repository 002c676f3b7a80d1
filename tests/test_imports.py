"""Importing image–text pairs from a folder, a JSONL manifest and a webdataset shard, each with
broken entries, into datasets the training pipeline reads."""
import io
import json
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
