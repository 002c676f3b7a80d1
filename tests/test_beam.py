"""Beam import and text annotation (issue 21) against the single-process paths, on DirectRunner.

The corpus (written here): three webdataset tars of 60 entries, the last cut short, and a JSONL
and a CSV manifest, with undecodable images, missing / empty / non-UTF-8 captions, missing
files and rows that do not parse. References: `imports.import_pairs` (one process), the
in-memory `annotate_split` of the same captions, and M4 on the in-memory annotations.
"""
import csv
import io
import json
import os
import tarfile

import jax
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from siglip_fair.annotate import beam_annotate
from siglip_fair.balance import m4, shards, stream
from siglip_fair.data import beam_import, imports

SIZE = 16
WORDS = ["a", "man", "woman", "doctor", "nurse", "librarian", "with", "his", "her", "book",
         "laptop", "broom", "in", "the", "park", "men's", "female"]
# Several workers: separate processes where the runner allows (the import), threads for the
# cheap annotation; one worker in memory for the reruns. The output must not depend on it.
TWO_PROCESSES = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
TWO_THREADS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
ONE = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _jpeg(rng) -> bytes:
  out = io.BytesIO()
  shape = (int(rng.integers(10, 24)), int(rng.integers(10, 24)), 3)
  PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(out, format="JPEG")
  return out.getvalue()


def _caption(rng) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))


def _tar(path, rng, stem0):
  with tarfile.open(path, "w") as tar:
    def add(name, data):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    for i in range(60):
      stem, r = f"{stem0 + i:06d}", rng.random()
      image = b"not a jpeg" if r < 0.05 else _jpeg(rng)
      add(stem + ".jpg", image)
      if 0.05 <= r < 0.09:
        continue  # no caption
      caption = (b"  \n" if 0.09 <= r < 0.12 else b"\xff\xfe bad" if 0.12 <= r < 0.14 else
                 (_caption(rng) + "\n" + _caption(rng)).encode())
      if 0.14 <= r < 0.2:
        add(stem + ".json", json.dumps({"caption": _caption(rng)}).encode())
      else:
        add(stem + ".txt", caption)


def _manifest_rows(root, rng, n, tag):
  rows = []
  for i in range(n):
    name, r = f"img/{tag}{i:03d}.jpg", rng.random()
    if r < 0.08:
      rows.append(None)  # does not parse
      continue
    if r < 0.14:
      rows.append({"image": f"img/absent{tag}{i}.jpg", "caption": _caption(rng)})
      continue
    with open(os.path.join(root, name), "wb") as f:
      f.write(b"garbage" if r < 0.2 else _jpeg(rng))
    rows.append({"image": name, "caption": "" if 0.2 <= r < 0.25 else _caption(rng)})
  return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  tars = [str(root / f"{t:05d}.tar") for t in range(3)]
  for t, path in enumerate(tars):
    _tar(path, rng, 1000 * t)
  with open(tars[-1], "rb") as f:
    data = f.read()
  with open(tars[-1], "wb") as f:
    f.write(data[:len(data) * 3 // 4])  # cut mid-shard
  os.makedirs(root / "img")
  # img2dataset's metadata beside each tar: one row per sample (downloaded or not), by key.
  for t in range(3):
    keys = [f"{1000 * t + i:06d}" for i in range(60)] + [f"{1000 * t + 99:06d}"]
    pq.write_table(pa.table({"key": keys, "status": ["success"] * 60 + ["failed_to_download"],
                             "similarity": rng.uniform(0.2, 0.4, 61).astype(np.float32)}),
                   str(root / f"{t:05d}.parquet"))
  jsonl = root / "pairs.jsonl"
  jsonl.write_text("\n".join("{not json" if r is None else json.dumps(r)
                             for r in _manifest_rows(root, rng, 50, "j")) + "\n")
  with open(root / "pairs.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption"])
    for r in _manifest_rows(root, rng, 40, "c"):
      writer.writerow(["", ""] if r is None else [r["image"], r["caption"]])
  return {"root": root, "tars": tars, "manifests": [str(jsonl), str(root / "pairs.csv")]}


@pytest.fixture(scope="module")
def webdataset(corpus):
  """(single-process import, Beam import on 2 worker processes) of the tars."""
  data_dir = str(corpus["root"] / "tfds")
  single = imports.import_pairs("webdataset", corpus["tars"], data_dir, name="single",
                                image_size=SIZE, num_workers=1)
  beam = beam_import.beam_import("webdataset", corpus["tars"], data_dir, name="beam",
                                 image_size=SIZE, beam_args=TWO_PROCESSES)
  return single, beam


def _bytes(folder, names):
  out = {}
  for name in names:
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = f.read()
  return out


def _assert_same_dataset(a, b):
  sa, sb = imports.data_source(a), imports.data_source(b)
  assert len(sa) == len(sb) > 0
  for i in range(len(sa)):
    ra, rb = sa[i], sb[i]
    assert ra["key"] == rb["key"], i
    np.testing.assert_array_equal(ra["image"], rb["image"])
    assert list(ra["captions"]) == list(rb["captions"]), i
  with open(os.path.join(a, "import_report.json")) as f, \
       open(os.path.join(b, "import_report.json")) as g:
    report_a, report_b = json.load(f), json.load(g)
  assert report_a == report_b
  assert list(report_a["skipped"]) == list(report_b["skipped"])  # same order of reasons
  assert report_a["kept"] == len(sa)
  return report_a


def test_webdataset_import_equals_single_process(webdataset):
  report = _assert_same_dataset(*webdataset)
  # Every kind of broken entry was met and counted (the corpus's point).
  assert {"undecodable image", "no caption", "empty caption", "caption not UTF-8",
          "unreadable tar: truncated before its end-of-archive marker"} <= set(report["skipped"])


def test_manifest_import_equals_single_process(corpus):
  data_dir = str(corpus["root"] / "tfds_manifest")
  single = imports.import_pairs("manifest", corpus["manifests"], data_dir, name="single",
                                image_size=SIZE, num_workers=1)
  beam = beam_import.beam_import("manifest", corpus["manifests"], data_dir, name="beam",
                                 image_size=SIZE, beam_args=TWO_THREADS)
  report = _assert_same_dataset(single, beam)
  assert {"row does not parse", "missing image file", "undecodable image",
          "empty caption"} <= set(report["skipped"])


def test_import_reruns_reuse_converted_units(corpus, webdataset, monkeypatch):
  """A rerun (one worker, in memory) converts nothing; a deleted unit is converted again, to
  the same bytes; the dataset equals the first run's either way."""
  data_dir = str(corpus["root"] / "tfds")
  staging = os.path.join(data_dir, ".beam_staging", "beam")
  staged = sorted(os.listdir(staging))
  assert len(staged) == 3 and all(f.endswith(".parquet") for f in staged)
  before = _bytes(staging, staged)
  calls = []
  convert = beam_import.convert_unit
  monkeypatch.setattr(beam_import, "convert_unit",
                      lambda *a: calls.append(a[1]) or convert(*a))
  again = beam_import.beam_import("webdataset", corpus["tars"], data_dir, name="again",
                                  image_size=SIZE, beam_args=ONE, staging_dir=staging)
  assert calls == []
  _assert_same_dataset(webdataset[1], again)
  os.remove(os.path.join(staging, staged[1]))
  # Through the command line, as a user resumes (Beam options passed through).
  assert beam_import.main(["webdataset", *corpus["tars"], "--data_dir", data_dir,
                           "--name", "third", f"--image_size={SIZE}", "--staging_dir", staging,
                           *ONE]) == 0
  assert len(calls) == 1
  assert _bytes(staging, staged) == before
  _assert_same_dataset(webdataset[1], os.path.join(data_dir, "third", "1.0.0"))


def test_import_errors_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.tar"):
    beam_import.beam_import("webdataset", [str(tmp_path / "absent.tar")], str(tmp_path),
                            name="x")
  shard = tmp_path / "broken.tar"
  with tarfile.open(shard, "w") as tar:
    info = tarfile.TarInfo("0.jpg")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"bad"))
  with pytest.raises(ValueError, match="no usable pairs.*no caption"):
    beam_import.beam_import("webdataset", [str(shard)], str(tmp_path / "tfds"), name="x",
                            image_size=SIZE, beam_args=ONE)
  assert not os.path.exists(tmp_path / "tfds" / "x")


@pytest.fixture(scope="module")
def text_shards(webdataset, tmp_path_factory):
  """(dataset, shard folder, utility, in-memory reference) of the Beam-imported tars."""
  dataset = webdataset[1]
  n = len(imports.data_source(dataset))
  root = tmp_path_factory.mktemp("annotations")
  utility = np.random.default_rng(1).normal(size=n).astype(np.float32)
  path = str(root / "scores.parquet")
  pq.write_table(pa.table({"key": np.arange(n), "clip_score": utility}), path, row_group_size=50)
  out = str(root / "text")
  ranges = beam_annotate.annotate_text(dataset, out, shard_size=32,
                                       utility=beam_annotate.split_utility(path + ":clip_score"),
                                       beam_args=TWO_THREADS)
  assert [(a, b) for a, b, _ in ranges] == [(a, min(a + 32, n)) for a in range(0, n, 32)]
  return dataset, out, path, beam_annotate.in_memory(dataset, utility=utility)


def _read_all(directory):
  parts = {}
  for _, chunk in shards.iter_chunks(shards.as_shards(directory), 1000):
    for k, v in chunk.items():
      parts.setdefault(k, []).append(v)
  return {k: np.concatenate(v) for k, v in parts.items()}


def test_text_shards_equal_in_memory_annotation(text_shards):
  _, out, _, ref = text_shards
  got = _read_all(out)
  assert sorted(got) == sorted(ref) == ["known", "s", "u", "w", "y"]
  for k, v in ref.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  # The lexicon found something in every field (else equality would prove little).
  assert all(ref[k].sum() > 0 for k in ("s", "y", "w", "known"))
  assert 0 < ref["known"].mean() < 1


def test_m4_from_beam_shards_equals_in_memory(text_shards):
  _, out, _, ref = text_shards
  cfg = m4.default_config()
  cfg.eta, cfg.eps_rep, cfg.eps_assoc = 0.7, 0.05, 0.05
  cfg.use_proxies, cfg.use_utility = True, True
  cfg.optim.steps, cfg.optim.refine_steps = 50, 200
  cfg.optim.chunk_size = 32  # = the shard size: in memory and streamed read equal chunks
  key = jax.random.key(5)
  a = stream.balance_stream(ref, cfg, key)
  b = stream.balance_stream(out, cfg, key)
  np.testing.assert_array_equal(a.q, b.q)
  np.testing.assert_array_equal(a.keep, b.keep)
  assert 0 < a.keep.mean() < 1


def test_annotation_rerun_skips_finished_shards(text_shards, capsys):
  dataset, out, utility, _ = text_shards
  files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
  before = _bytes(out, files)
  stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files}
  os.remove(os.path.join(out, files[2]))
  args = [dataset, "--output", out, "--shard_size", "32", "--utility", utility + ":clip_score",
          *ONE]
  assert beam_annotate.main(args) == 0
  assert f"{len(files) - 1} of {len(files)} shards already" in capsys.readouterr().out
  assert _bytes(out, files) == before
  assert all(os.stat(os.path.join(out, f)).st_mtime_ns == stamps[f]
             for f in files if f != files[2])
  # Other settings never mix into the folder.
  with pytest.raises(ValueError, match=r"other settings \(\['caption_index'\]"):
    beam_annotate.annotate_text(dataset, out, shard_size=32, caption_index=1,
                                utility=beam_annotate.split_utility(utility + ":clip_score"),
                                beam_args=ONE)
  with pytest.raises(ValueError, match="has no column 'score'"):
    beam_annotate.annotate_text(dataset, out + "2", utility=(utility, "score"), beam_args=ONE)


def test_utility_joined_by_key_from_img2dataset_metadata(corpus, webdataset, tmp_path):
  """u from img2dataset's per-tar parquet files (`key`, `similarity`), joined by each record's
  key, against a lookup of the same files row by row."""
  dataset = webdataset[1]
  source = imports.data_source(dataset)
  tables = {}
  want = []
  for i in range(len(source)):
    tar_name, stem = source[i]["key"].decode().split("/")
    if tar_name not in tables:
      table = pq.read_table(str(corpus["root"] / tar_name.replace(".tar", ".parquet")))
      tables[tar_name] = dict(zip(table["key"].to_pylist(), table["similarity"].to_pylist()))
    want.append(tables[tar_name][stem])
  spec = beam_annotate.split_utility(f"{corpus['root']}:similarity")
  beam_annotate.annotate_text(dataset, str(tmp_path / "ann"), shard_size=50, utility=spec,
                              beam_args=ONE)
  got = _read_all(str(tmp_path / "ann"))
  np.testing.assert_array_equal(got["u"], np.asarray(want, np.float32))
  ref = beam_annotate.in_memory(dataset)
  for k in ("s", "known", "y", "w"):
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  with pytest.raises(Exception, match="needs columns 'key' and 'clip'"):
    beam_annotate.annotate_text(dataset, str(tmp_path / "bad"), shard_size=50,
                                utility=(str(corpus["root"]), "clip"), beam_args=ONE)


def test_img2dataset_parquet_shards_import_like_the_same_tars(tmp_path):
  """img2dataset's `--output_format parquet` (images inside, a null `jpg` for a failed
  download) against the same successful samples written as tars and imported by `imports`."""
  rng = np.random.default_rng(3)
  parquets, tars = [], []
  for t in range(2):
    keys, images, captions, status = [], [], [], []
    tar_path = str(tmp_path / f"{t:05d}.tar")
    with tarfile.open(tar_path, "w") as tar:
      for i in range(30):
        key, r = f"{t:05d}{i:04d}", rng.random()
        image = None if r < 0.15 else b"broken" if r < 0.2 else _jpeg(rng)
        caption = "" if 0.2 <= r < 0.25 else _caption(rng)
        keys.append(key)
        images.append(image)
        captions.append(None if image is None else caption)
        status.append("failed_to_download" if image is None else "success")
        if image is not None:
          for ext, data in (("jpg", image), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = str(tmp_path / f"{t:05d}.parquet")
    pq.write_table(pa.table({"key": keys, "jpg": pa.array(images, pa.binary()), "txt": captions,
                             "status": status}), path)
    parquets.append(path)
    tars.append(tar_path)
  ref = imports.import_pairs("webdataset", tars, str(tmp_path / "tfds"), name="tars",
                             image_size=SIZE, num_workers=1)
  got = beam_import.beam_import("parquet", parquets, str(tmp_path / "tfds"), name="parquets",
                                image_size=SIZE, beam_args=TWO_THREADS)
  sa, sb = imports.data_source(ref), imports.data_source(got)
  assert len(sa) == len(sb) > 0
  for i in range(len(sa)):
    assert sa[i]["key"].replace(b".tar/", b".parquet/") == sb[i]["key"]
    np.testing.assert_array_equal(sa[i]["image"], sb[i]["image"])
    assert list(sa[i]["captions"]) == list(sb[i]["captions"])
  with open(os.path.join(ref, "import_report.json")) as f, \
       open(os.path.join(got, "import_report.json")) as g:
    tar_report, parquet_report = json.load(f), json.load(g)
  failed = parquet_report["skipped"].pop("not downloaded")
  assert failed == sum(s == "failed_to_download" for p in parquets
                       for s in pq.read_table(p)["status"].to_pylist()) > 0
  assert parquet_report["skipped"] == tar_report["skipped"]
  assert {"undecodable image", "empty caption"} <= set(tar_report["skipped"])
  with pytest.raises(ValueError, match="has no images|columns 'key' and 'jpg'"):
    meta = str(tmp_path / "meta.parquet")
    pq.write_table(pa.table({"key": ["a"], "caption": ["b"]}), meta)
    beam_import.beam_import("parquet", [meta], str(tmp_path / "tfds"), name="meta")
