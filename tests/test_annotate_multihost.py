"""Multi-host zero-shot image annotation into row-range parquet shards (issue 21, item 2).

A tiny random two-tower model annotates a few hundred random images. References: the one-host
in-memory path (`ZeroShotAnnotator.annotate`) and `combine.combine` on in-memory arrays.

This file is also the child of the two-process test:

    python tests/test_annotate_multihost.py PROCESS_ID PORT OUT_DIR RUN_DIR
    python tests/test_annotate_multihost.py alone OUT_DIR   (the child that is killed)
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

if __name__ == "__main__":  # a child process: 2 fake CPU devices, before jax is imported
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                             "--xla_backend_optimization_level=0")  # as conftest.py
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections
import numpy as np
import pytest

import fake_towers
from siglip_fair.annotate import multihost, zeroshot
from siglip_fair.annotate.combine import combine
from siglip_fair.balance import shards
from siglip_fair.train import checkpoint

N, SIZE, BATCH, SHARD = 200, 16, 8, 24  # 9 shards, the last one of 8 rows


def setup(min_margin=0.25):
  """(annotator, params, source) of a random tiny two-tower model and N random images."""
  from siglip_fair.models import embed_fns, make_model  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.two_tower import temperature  # pylint: disable=g-import-not-at-top
  model = make_model(ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4"), text=dict(variant="mu", vocab_size=320, max_len=12),
      embed_dim=16)))
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32),
                               np.ones((1, 12), np.int32))["params"]
  cfg = zeroshot.default_config()
  cfg.templates, cfg.fields = ("a photo of {}.", "{}"), ("s", "y", "w")
  cfg.batch_size, cfg.min_margin = BATCH, min_margin
  embed_images, embed_texts = embed_fns(model)
  annotator = zeroshot.ZeroShotAnnotator(embed_images, embed_texts, fake_towers.WordHash(),
                                         temperature, cfg)
  images = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), np.uint8)
  return annotator, params, [{"image": x} for x in images]


def _files(folder):
  """{name: bytes} of the parquet files of a folder."""
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".parquet"):
      with open(os.path.join(folder, f), "rb") as file:
        out[f] = file.read()
  return out


def _save_run(run, params):
  """A training run's checkpoint layout (train/checkpoint.py) holding `params` as the moving
  average, and other raw params (not to be used), both replicated over every device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P

  everywhere = NamedSharding(jax.make_mesh((len(jax.devices()),), ("d",)), P())
  state = {"params": jax.tree.map(lambda x: -x, params), "ema_params": params,
           "step": np.int32(3)}
  with checkpoint.make_manager(run) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
        jax.device_put(state, everywhere))))
    manager.wait_until_finished()
  loaded = checkpoint.load_params(run)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                  jax.tree.leaves(params)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_one_process_shards_which_equal_the_in_memory_path(tmp_path):
  annotator, params, source = setup()
  one = multihost.annotate_shards(annotator, params, source, tmp_path / "one", shard_size=SHARD,
                                  devices=jax.devices()[:4])
  assert one == dict(one, rows=N, shards=9, written=9, skipped=0, complete=True)
  # The in-memory one-host path: one plain jit on one device over the whole source.
  reference = annotator.annotate(params, source)
  got = multihost.load_shards(tmp_path / "one", n=N)
  for k in ("s", "known", "y", "w", "u"):
    np.testing.assert_array_equal(got[k], reference[k], err_msg=k)
  # Not a degenerate instance: some rows known and some not, several occupations and proxies.
  assert 0.2 < reference["known"].mean() < 0.95
  assert len(np.unique(reference["y"].argmax(1))) > 2 and 0 < reference["w"].mean() < 1

  # The children read the params from a run's checkpoint saved here with arrays on all 8 of
  # this process's devices, which no child has (each has 2): restored onto each child's own.
  run = str(tmp_path / "run")
  _save_run(run, params)
  port, env = _free_port(), dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                             str(tmp_path / "two"), run], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  # The summary line; warnings of the shutdown may follow it.
  summaries = [json.loads(next(line[len("SUMMARY "):] for line in log.splitlines()
                               if line.startswith("SUMMARY "))) for log in logs]
  # Process 0 writes ranges 0, 2, 4, 6, 8 (the last of 8 rows); process 1 ranges 1, 3, 5, 7.
  assert [(s["written"], s["rows"]) for s in summaries] == [(5, 4 * SHARD + 8), (4, 4 * SHARD)]
  assert summaries[0]["complete"] and "rows/s" in logs[0]
  assert _files(tmp_path / "two") == _files(tmp_path / "one")  # byte for byte


def test_a_run_stopped_midway_resumes_and_skips_finished_shards(tmp_path):
  annotator, params, source = setup()
  full = multihost.annotate_shards(annotator, params, source, tmp_path / "full",
                                   shard_size=20, devices=jax.devices()[:1])
  part = multihost.annotate_shards(annotator, params, source, tmp_path / "run",
                                   shard_size=20, devices=jax.devices()[:2], max_shards=4)
  assert (part["written"], part["complete"]) == (4, False)
  before = {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in _files(tmp_path / "run")}
  assert len(before) == 4
  # What a writer killed mid-file leaves: a hidden temporary file, never read as a shard.
  (tmp_path / "run" / ".tmp_image-rows-000000000080-000000000100.parquet.x").write_bytes(b"PAR")
  lines = []
  rest = multihost.annotate_shards(annotator, params, source, tmp_path / "run", shard_size=20,
                                   devices=jax.devices()[:4], log=lines.append)
  assert (rest["skipped"], rest["written"], rest["complete"]) == (4, 6, True)
  assert "4 done before, 6 to write" in lines[0]
  assert {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in before} == before  # untouched
  assert _files(tmp_path / "run") == _files(tmp_path / "full")
  assert full["written"] == 10
  # shard_size 20 is no multiple of the batch (8): rows 16-23 are one batch in memory but two
  # here; the annotations are still those of the in-memory path.
  reference = annotator.annotate(params, source)
  got = multihost.load_shards(tmp_path / "run", n=N)
  for k in ("s", "known", "y", "w"):
    np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def test_separate_jobs_each_write_their_share(tmp_path):
  """process_index/process_count given by hand (no JAX job): shares as in a joint run."""
  annotator, params, source = setup()
  jobs = [multihost.annotate_shards(annotator, params, source, tmp_path / "jobs",
                                    shard_size=SHARD, process_index=i, process_count=3)
          for i in (2, 0, 1)]  # process 0 is not last: it must not check coverage
  assert [(j["written"], j["complete"]) for j in jobs] == [(3, False), (3, False), (3, False)]
  multihost.annotate_shards(annotator, params, source, tmp_path / "one", shard_size=SHARD)
  assert _files(tmp_path / "jobs") == _files(tmp_path / "one")
  assert len(shards.check_coverage(tmp_path / "jobs", N, "image")) == 9


class _Slow(list):
  """A source whose reads take a while, so that a kill lands midway through a run."""

  def __getitem__(self, i):
    time.sleep(0.05)
    return super().__getitem__(i)


def test_a_killed_run_leaves_whole_shards_and_the_rerun_completes_them(tmp_path):
  annotator, params, source = setup()
  multihost.annotate_shards(annotator, params, source, tmp_path / "one", shard_size=SHARD)
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "alone",
                           str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  first = tmp_path / "run" / shards.shard_name("image", 0, SHARD)
  while not first.exists() and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  log = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, log[-3000:]
  done = _files(tmp_path / "run")
  assert 1 <= len(done) < 9, log[-3000:]  # killed midway: some shards, not all
  before = {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in done}
  lines = []
  rest = multihost.annotate_shards(annotator, params, source, tmp_path / "run",
                                   shard_size=SHARD, log=lines.append)
  assert (rest["skipped"], rest["written"], rest["complete"]) == (len(done), 9 - len(done), True)
  assert f"{len(done)} done before" in lines[0]
  assert {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in before} == before
  assert _files(tmp_path / "run") == _files(tmp_path / "one")


def test_a_resume_with_other_settings_is_refused(tmp_path):
  annotator, params, source = setup()
  multihost.annotate_shards(annotator, params, source, tmp_path, shard_size=50, max_shards=1)
  other, _, _ = setup(min_margin=0.3)
  with pytest.raises(ValueError) as e:
    multihost.annotate_shards(other, params, source, tmp_path, shard_size=50)
  assert "zeroshot.min_margin=0.25 there, 0.3 now" in str(e.value)
  assert "shard_size" not in str(e.value)
  with pytest.raises(ValueError) as e:
    multihost.annotate_shards(annotator, params, source, tmp_path, shard_size=40)
  assert "shard_size=50 there, 40 now" in str(e.value) and "min_margin" not in str(e.value)
  assert len(_files(tmp_path)) == 1


def _text_annotations(seed):
  """Random text-side annotations with unknown rows and a utility column."""
  rng = np.random.default_rng(seed)
  known = (rng.random(N) < 0.6).astype(np.float32)
  s = np.eye(2, dtype=np.float32)[rng.integers(0, 2, N)] * known[:, None]
  y = (rng.random((N, 10)) < 0.1).astype(np.float32)  # rows with no label: image side's
  w = (rng.random((N, 10)) < 0.3).astype(np.float32)
  return dict(s=s, known=known, y=y, w=w, u=rng.normal(size=N).astype(np.float32))


def _write(ann, folder, cut, prefix="annotations"):
  n = len(ann["s"])
  for a in range(0, n, cut):
    b = min(a + cut, n)
    shards.write_parquet_shard(os.path.join(folder, shards.shard_name(prefix, a, b)),
                               {k: v[a:b] for k, v in ann.items()})


def test_combining_text_and_image_shards_by_row_equals_combine_in_memory(tmp_path):
  annotator, params, source = setup()
  multihost.annotate_shards(annotator, params, source, tmp_path / "image", shard_size=SHARD,
                            devices=jax.devices()[:2])
  image = annotator.annotate(params, source)
  for seed, rule in enumerate(("either", "both", "text_first")):
    text = _text_annotations(seed)
    cut = (50, 64, SHARD)[seed]  # another cut than the image side's, and the same one
    _write(text, tmp_path / f"text{seed}", cut)
    out = tmp_path / f"{rule}"
    paths = multihost.combine_shards(tmp_path / f"text{seed}", tmp_path / "image", rule, out)
    assert len(paths) == -(-N // cut)
    got = multihost.load_shards(out, "annotations", n=N)
    want = combine(text, image, rule)
    for k in ("s", "known", "y", "w"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{rule} {k}")
    np.testing.assert_array_equal(got["u"], text["u"])
    assert sum(len(s) for s in shards.as_shards(str(out))) == N  # what M4 streams
  # The command line writes the same files.
  assert multihost.main(["combine", "--text", str(tmp_path / "text2"), "--image",
                         str(tmp_path / "image"), "--rule", "text_first", "--output",
                         str(tmp_path / "cli")]) == 0
  assert _files(tmp_path / "cli") == _files(tmp_path / "text_first")


def test_shard_folders_with_gaps_or_other_rows_are_refused(tmp_path, capsys):
  text = _text_annotations(0)
  _write(text, tmp_path / "text", 50)
  _write({k: v[:150] for k, v in text.items()}, tmp_path / "short", 50, prefix="image")
  _write(_text_annotations(1), tmp_path / "image", 40, prefix="image")
  os.remove(tmp_path / "image" / shards.shard_name("image", 80, 120))
  out = tmp_path / "out"
  cases = [
      (lambda: multihost.combine_shards(tmp_path / "text", tmp_path / "image", "either", out),
       "rows [80, 120) are missing"),
      (lambda: multihost.load_shards(tmp_path / "image", n=N), "rows [80, 120) are missing"),
      (lambda: multihost.combine_shards(tmp_path / "text", tmp_path / "short", "both", out),
       "cover rows [0, 200) but the image shards"),
      (lambda: multihost.combine_shards(tmp_path / "text", tmp_path / "short", "both", out,
                                        n=150), "hold more rows than the dataset"),
      (lambda: multihost.combine_shards(tmp_path / "text", tmp_path / "short", "both",
                                        tmp_path / "text"), "must differ from the input"),
      (lambda: multihost.combine_shards(tmp_path / "text", tmp_path / "short", "nope", out),
       "expected one of")]
  for call, match in cases:
    try:
      call()
    except ValueError as e:
      assert match in str(e), (match, str(e))
    else:
      raise AssertionError(f"no error for {match!r}")
  assert not os.path.exists(out)
  # The command line: exit status 1 and the message, no traceback.
  assert multihost.main(["combine", "--text", str(tmp_path / "text"), "--image",
                         str(tmp_path / "image"), "--rule", "both", "--output", str(out)]) == 1
  assert "rows [80, 120) are missing" in capsys.readouterr().err
  assert multihost.main(["images", "--workdir", str(tmp_path / "w")]) == 1
  assert "zeroshot.checkpoint is required" in capsys.readouterr().err
  assert not os.path.exists(out) and not os.path.exists(tmp_path / "w")


def _child():
  if sys.argv[1] == "alone":  # one process, slow reads: killed by the test midway
    annotator, params, source = setup()
    multihost.annotate_shards(annotator, params, _Slow(source), sys.argv[2], shard_size=SHARD)
    return
  pid, port, out, run = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid, initialization_timeout=300)
  assert jax.process_count() == 2 and len(jax.local_devices()) == 2
  annotator, _, source = setup()
  params = checkpoint.load_params(run)  # saved on 8 devices; restored on this process's own
  summary = multihost.annotate_shards(annotator, params, source, out, shard_size=SHARD)
  print("SUMMARY " + json.dumps(summary), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _child()
