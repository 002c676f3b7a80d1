"""M4 over shards: layout independence, sampled solves against the exact QP, properties,
repeat counts, warm starts, shard I/O and one compilation per chunk function."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from compiles import count_compiles
from siglip_fair.balance import card as cardlib
from siglip_fair.balance import m4, qp, shards, stream



def _config(**optim):
  cfg = m4.default_config()
  cfg.eta, cfg.eps_rep, cfg.eps_assoc = 0.7, 0.005, 0.005
  cfg.use_proxies = True
  for k, v in optim.items():
    cfg.optim[k] = v
  return cfg


def _instance(seed=0, n=6000, c=8, p=3):
  ann, pi = qp.random_instance(seed, n, 2, c, p)
  return ann, pi


@pytest.mark.parametrize("sample_size", [1 << 18, 2500])  # all rows; a sample
def test_ten_shards_equal_one_in_memory_pass(tmp_path, sample_size):
  ann, pi = _instance()
  cfg = _config(sample_size=sample_size, chunk_size=1024)
  cfg.pi = tuple(float(x) for x in pi)
  key = jax.random.key(3)
  ref = stream.balance_stream(ann, cfg, key)
  paths = shards.write_shards(ann, tmp_path / "ann", 10)
  assert len(paths) == 10 and sorted(paths) == paths
  for source in (str(tmp_path / "ann"), paths[::-1][::-1]):
    got = stream.balance_stream(source, cfg, key)
    np.testing.assert_allclose(got.q, ref.q, atol=1e-5)
    np.testing.assert_array_equal(got.keep, ref.keep)
    assert got.card["kept"]["expected"] == pytest.approx(ref.card["kept"]["expected"], abs=1e-6)
    assert got.card["verdict"] == ref.card["verdict"]
  # The streamed card sums are the in-memory reference's (card.card_sums), chunk by chunk.
  # 8192-row chunks are summed in pieces of stream._PIECE rows inside the jitted function.
  expected = cardlib.card_sums(ann, ref.q, ref.keep)
  for chunk in (1024, 2 * stream._PIECE):
    sums = stream.card_pass(stream.Plan(shards.as_shards(paths)), cfg, chunk, ref.q, ref.keep)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3), sums,
                 expected)


def test_sampled_solve_with_polish_matches_exact_qp():
  ann, pi = _instance(seed=1, n=12000)
  cfg = _config(sample_size=3000, chunk_size=2048, polish_steps=40)
  cfg.pi = tuple(float(x) for x in pi)
  result = stream.balance_stream(ann, cfg, jax.random.key(0))
  exact = qp.solve_qp(ann, cfg)
  assert exact["status"] == "optimal"
  assert result.card["solved_on"].items() >= {"sample": 3000, "n": 12000}.items()
  ours = qp.objective(result.q, ann["u"], cfg.eta)
  assert abs(ours - exact["objective"]) <= 0.01 * abs(exact["objective"])
  moments = m4.constraint_moments(result.q, ann, exact["pi"])
  for block in ("rep", "assoc", "proxy"):
    assert np.all(np.abs(moments[block]) <= exact["eps"][block] + 1e-3), block
  assert abs(result.q.mean() - cfg.eta) <= 1e-3
  assert 0 < result.card["dual_steps"]["polish"] <= 40  # a cap: it stops at the criterion
  # Without the polish, the sample's duals alone cost objective (that is why it runs).
  cfg.optim.polish_steps = 0
  raw = stream.balance_stream(ann, cfg, jax.random.key(0))
  assert abs(qp.objective(raw.q, ann["u"], cfg.eta) - exact["objective"]) > abs(
      ours - exact["objective"])


@pytest.mark.parametrize("seed", range(4))
def test_properties_on_random_instances(seed):
  rng = np.random.default_rng(seed)
  ann, pi = _instance(seed=10 + seed, n=int(rng.integers(500, 4000)),
                      c=int(rng.integers(1, 12)), p=int(rng.integers(0, 4)))
  cfg = _config()
  cfg.eta = float(rng.uniform(0.5, 0.95))
  cfg.pi = tuple(float(x) for x in pi)
  loose = stream.balance_stream(ann, cfg, jax.random.key(seed))
  assert np.all((loose.q >= 0) & (loose.q <= 1))
  assert abs(loose.q.mean() - cfg.eta) <= 1e-3
  if loose.card["verdict"] == "feasible":
    assert loose.card["largest_violation"]["residual"] <= cfg.tol
  # Tightening ε can only cost objective (it shrinks the feasible set).
  cfg.eps_assoc = cfg.eps_rep = 0.002
  tight = stream.balance_stream(ann, cfg, jax.random.key(seed))
  if tight.card["verdict"] == "feasible":
    assert (qp.objective(tight.q, ann["u"], cfg.eta)
            >= qp.objective(loose.q, ann["u"], cfg.eta) - 1e-6)


def test_repeat_counts_are_q_over_eta_in_expectation():
  q = np.repeat(np.array([0.0, 0.1, 0.35, 0.7, 1.0], np.float32), 40000)
  r = stream.repeat_counts(q, 0.7, jax.random.key(0))
  assert r.dtype == np.int32 and r.min() >= 0
  means = r.reshape(5, -1).mean(1)
  np.testing.assert_allclose(means, [0, 0.1 / 0.7, 0.5, 1.0, 1 / 0.7], atol=0.01)
  # Integer parts are exact: q / η = 1/0.7 gives 1 or 2 copies, never 0 or 3.
  assert set(np.unique(r[-40000:])) == {1, 2}
  ann, pi = _instance(n=3000)
  cfg = _config()
  cfg.repeats = True
  result = stream.balance_stream(ann, cfg, jax.random.key(1))
  assert abs(result.repeats.sum() / 3000 - 1.0) < 0.03  # the baseline's size


def test_warm_start_from_converged_duals_needs_no_stochastic_phase():
  ann, pi = _instance(n=4000)
  cfg = _config()
  cfg.pi = tuple(float(x) for x in pi)
  cold = stream.balance_stream(ann, cfg, jax.random.key(0))
  cfg.optim.steps, cfg.optim.refine_steps = 0, 3  # no stochastic phase
  warm = stream.balance_stream(ann, cfg, jax.random.key(0), init=cold.duals)
  np.testing.assert_allclose(warm.q, cold.q, atol=2e-3)
  unwarmed = stream.balance_stream(ann, cfg, jax.random.key(0))
  assert np.abs(unwarmed.q - cold.q).max() > 10 * np.abs(warm.q - cold.q).max()


def test_shard_io(tmp_path):
  ann, _ = _instance(n=1003)
  paths = shards.write_shards(ann, tmp_path, 4, prefix="x")
  assert [p.rsplit("/", 1)[1] for p in paths] == [f"x-{i:05d}-of-00004.npz" for i in range(4)]
  opened = shards.as_shards(str(tmp_path))
  assert [len(s) for s in opened] == [251, 251, 250, 251]  # round(linspace(0, 1003, 5))
  with np.load(paths[0]) as f:  # multi-hot fields stored compactly, utility as is
    assert f["y"].dtype == np.uint8 and f["u"].dtype == np.float32
  got = {k: np.concatenate([s.read(0, len(s))[k] for s in opened]) for k in shards.FIELDS}
  for k in shards.FIELDS:
    np.testing.assert_array_equal(got[k], ann[k])
  chunks = list(shards.iter_chunks(opened, 100))
  assert [o for o, _ in chunks][:4] == [0, 100, 200, 251]  # a chunk never spans two shards
  assert sum(len(c["s"]) for _, c in chunks) == 1003
  # Record sources (e.g. tfds.data_source) with the fields in each record.
  records = [{"s": ann["s"][i], "y": ann["y"][i], "w": ann["w"][i]} for i in range(50)]
  rec = shards.RecordShard(records).read(10, 20)
  np.testing.assert_array_equal(rec["known"], (ann["s"][10:20].sum(1) > 0))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    shards.as_shards(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="no .npz or .parquet annotation shards"):
    shards.as_shards(str(tmp_path / "empty")) if (tmp_path / "empty").mkdir() is None else None
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="bad.npz.*not a readable"):
    shards.NpzShard(tmp_path / "bad.npz")


def test_npz_shards_are_mapped_when_stored_and_loaded_when_compressed(tmp_path):
  ann, _ = _instance(n=500)
  ann["w"] = np.asfortranarray(ann["w"])  # a Fortran-order member maps too
  np.savez(tmp_path / "plain.npz", **ann)
  np.savez_compressed(tmp_path / "small.npz", **ann)
  plain, small = shards.NpzShard(tmp_path / "plain.npz"), shards.NpzShard(tmp_path / "small.npz")
  assert all(isinstance(v, np.memmap) for v in shards._stored_views(plain.path).values())
  assert shards._stored_views(small.path) is None
  for shard in (plain, small):
    got = shard.read(0, len(shard))
    for k in shards.FIELDS:
      np.testing.assert_array_equal(got[k], ann[k])


def _write_parquet(ann, path, rows, row_group_size):
  """Writes rows of `ann` with pyarrow itself: [n, k] fields as fixed-size list columns."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  columns = {}
  for k in shards.FIELDS:
    x = ann[k][rows]
    columns[k] = (pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
                  if x.ndim == 2 else pa.array(x))
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_shards_equal_npz_shards(tmp_path):
  ann, pi = _instance(n=3000)
  cfg = _config(chunk_size=512)
  cfg.pi = tuple(float(x) for x in pi)
  folder = tmp_path / "pq"
  folder.mkdir()
  cuts = [0, 1000, 1777, 3000]
  for i, (a, b) in enumerate(zip(cuts, cuts[1:])):  # row groups straddle the 512-row chunks
    _write_parquet(ann, folder / f"part-{i}.parquet", slice(a, b), row_group_size=300)
  opened = shards.as_shards(str(folder))
  assert [len(s) for s in opened] == [1000, 777, 1223]
  got = {k: np.concatenate([c[k] for _, c in shards.iter_chunks(opened, 512)])
         for k in shards.FIELDS}
  for k in shards.FIELDS:
    np.testing.assert_array_equal(got[k], ann[k])
  key = jax.random.key(1)
  ref = stream.balance_stream(shards.write_shards(ann, tmp_path / "npz", 3), cfg, key)
  result = stream.balance_stream(str(folder), cfg, key)
  np.testing.assert_allclose(result.q, ref.q, atol=1e-6)
  np.testing.assert_array_equal(result.keep, ref.keep)
  (tmp_path / "bad.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="bad.parquet.*not a readable .parquet"):
    shards.as_shards(str(tmp_path / "bad.parquet"))


def test_bad_values_name_the_field_and_shard(tmp_path):
  ann, _ = _instance(n=900)
  bad = dict(ann, y=ann["y"].copy())
  bad["y"][700, 0] = 2.0
  paths = shards.write_shards(bad, tmp_path, 3)
  with pytest.raises(ValueError, match=r"'y'.*\[0.0, 2.0\].*shard 2"):
    stream.balance_stream(paths, _config(chunk_size=128), jax.random.key(0))
  nan = dict(ann, u=ann["u"].copy())
  nan["u"][5] = np.nan
  cfg = _config()
  cfg.use_utility = True
  with pytest.raises(ValueError, match="'u'.*non-finite.*shard 0"):
    stream.balance_stream(nan, cfg, jax.random.key(0))


def test_chunk_functions_compile_once_across_shard_sizes(tmp_path):
  ann, pi = _instance(n=5000)
  cfg = _config(chunk_size=512)
  cfg.pi = tuple(float(x) for x in pi)
  stream.balance_stream(ann, cfg, jax.random.key(0))  # warm the caches
  paths = shards.write_shards(ann, tmp_path, 7)  # uneven shards: padded last chunks
  # Same dtypes as the uint8 shards, so only the first layout may compile anything.
  with count_compiles() as compiles:
    stream.balance_stream(paths, cfg, jax.random.key(0))
  with count_compiles() as again:
    stream.balance_stream(shards.write_shards(ann, tmp_path / "b", 3), cfg, jax.random.key(0))
  assert not again, len(compiles)


def distributed_config():
  """The config of the device / process tests (a sampled solve, so every pass is exercised)."""
  cfg = _config(sample_size=3000, chunk_size=700, polish_steps=3)
  cfg.pi = (0.45, 0.35)
  return cfg


@pytest.mark.parametrize("num_devices", [1, 2, 4])
def test_solver_result_does_not_depend_on_the_device_count(num_devices):
  ann, _ = _instance(seed=4, n=7000)
  cfg = distributed_config()
  everywhere = stream.balance_stream(ann, cfg, jax.random.key(5))  # 8 fake CPU devices
  assert everywhere.card["solved_on"].items() >= {"sample": 3000, "n": 7000}.items()
  fewer = stream.balance_stream(ann, cfg, jax.random.key(5), devices=jax.devices()[:num_devices])
  np.testing.assert_allclose(fewer.q, everywhere.q, atol=1e-5)
  assert fewer.card["dual_steps"] == everywhere.card["dual_steps"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback_equal_one_device(tmp_path):
  ann, _ = _instance(seed=4, n=7000)
  folder = tmp_path / "shards"
  shards.write_shards(ann, folder, 5)  # process 0 reads shards 0, 2, 4; process 1 reads 1, 3
  single = stream.balance_stream(str(folder), distributed_config(), jax.random.key(5),
                                 devices=jax.devices()[:1])
  port = _free_port()
  script = os.path.join(os.path.dirname(__file__), "m4_process.py")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), str(folder),
                             str(tmp_path / f"out{i}.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
  rows, q, keep = [], [], []
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz") as f:
      rows.append(f["rows"])
      q.append(f["q"])
      keep.append(f["keep"])
      card = json.loads(str(f["card"]))
    assert card["kept"]["expected"] == pytest.approx(single.card["kept"]["expected"], abs=1e-6)
    assert card["verdict"] == single.card["verdict"]
  rows, q, keep = map(np.concatenate, (rows, q, keep))
  assert np.array_equal(np.sort(rows), np.arange(7000))  # the processes split the rows
  assert np.abs(q - single.q[rows]).max() <= 1e-5
  np.testing.assert_array_equal(keep, single.keep[rows])


def test_tolerances_per_family():
  ann, _ = _instance(n=2000, c=4, p=3)
  cfg = _config()
  cfg.eps_assoc, cfg.tolerance = 0.1, "relative"
  cfg.eps_proxy, cfg.tolerance_proxy = 0.003, "absolute"
  totals = m4.totals(m4.prepare(ann, cfg))
  eps = m4.tolerances(cfg, totals)
  np.testing.assert_allclose(eps["assoc"], np.tile(0.1 * ann["y"].mean(0), (2, 1)), rtol=1e-6)
  np.testing.assert_allclose(eps["proxy"], np.full((2, 3), 0.003))
  cfg.eps_proxy = cfg.tolerance_proxy = None  # proxies follow the label family
  np.testing.assert_allclose(m4.tolerances(cfg, totals)["proxy"],
                             np.tile(0.1 * ann["w"].mean(0), (2, 1)), rtol=1e-6)
  cfg.tolerance_proxy = "relatve"
  with pytest.raises(ValueError, match="tolerance_proxy must be"):
    m4.check_config(cfg)


def test_shapes_of_parquet_and_record_shards_are_checked_as_they_are_read(tmp_path):
  ann, _ = _instance(n=600)
  cfg = _config(chunk_size=256)
  # Records: shapes are known only once read; a [1]-shaped utility per record is [n, 1].
  records = [{"s": ann["s"][i], "y": ann["y"][i], "w": ann["w"][i], "u": ann["u"][i:i + 1]}
             for i in range(300)]
  with pytest.raises(ValueError, match=r"annotations: 'u' has shape \(256, 1\) but "
                                       r"must be \[N\].*flatten"):
    stream.balance_stream([shards.RecordShard(records, fields=("s", "y", "w", "u"))], cfg,
                          jax.random.key(0))
  # Parquet shards whose label columns differ are refused, naming the second file.
  folder = tmp_path / "pq"
  folder.mkdir()
  _write_parquet(ann, folder / "a.parquet", slice(0, 300), row_group_size=100)
  _write_parquet(dict(ann, y=ann["y"][:, :5]), folder / "b.parquet", slice(300, 600),
                 row_group_size=100)
  with pytest.raises(ValueError, match=r"b.parquet.*'y' has 5 columns \(labels\) but the "
                                       "first shard has 8"):
    stream.balance_stream(str(folder), cfg, jax.random.key(0))
