"""Pseudo-group clustering against scikit-learn: k-means inertia, ARI, NMI; purity by loops."""
import jax
import numpy as np
import pytest
from sklearn import cluster as sk_cluster
from sklearn import metrics as sk_metrics

from siglip_fair.debias import cluster


def _blobs(seed, n=600, k=4, d=5, spread=1.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 4, (k, d))
  truth = rng.integers(0, k, n)
  return (centers[truth] + spread * rng.normal(size=(n, d))).astype(np.float32), truth


@pytest.mark.parametrize("seed,k,spread", [(0, 4, 1.0), (1, 6, 3.0), (2, 3, 8.0)])
def test_kmeans_inertia_matches_sklearn(seed, k, spread):
  x, _ = _blobs(seed, k=k, spread=spread)
  ours = cluster.kmeans(x, k, key=jax.random.key(seed), restarts=8)
  ref = sk_cluster.KMeans(k, n_init=8, random_state=seed).fit(x)
  assert float(ours.inertia) <= 1.01 * ref.inertia_, (float(ours.inertia), ref.inertia_)
  # The reported inertia and labels are those of the returned centres.
  dists = ((x[:, None] - np.asarray(ours.centers)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(ours.labels), dists.argmin(1))
  assert float(ours.inertia) == pytest.approx(dists.min(1).sum(), rel=1e-4)


def test_kmeans_recovers_separated_groups_and_is_deterministic():
  x, truth = _blobs(3, k=5, spread=0.3)
  a = cluster.kmeans(x, 5, key=jax.random.key(0))
  b = cluster.kmeans(x, 5, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
  assert cluster.adjusted_rand_index(truth, np.asarray(a.labels)) == pytest.approx(1.0)
  # Duplicated points and k = n still work (no NaN from the k-means++ weights).
  same = np.ones((6, 2), np.float32)
  assert float(cluster.kmeans(same, 3, key=jax.random.key(1)).inertia) == 0.0
  # k = n: every point its own centre (up to float32 rounding of ||x||² − 2x·c + ||c||²).
  assert float(cluster.kmeans(x[:7], 7, key=jax.random.key(1)).inertia) < 1e-3
  for bad in (0, 601):
    with pytest.raises(ValueError, match="k="):
      cluster.kmeans(x, bad, key=jax.random.key(0))


@pytest.mark.parametrize("seed", range(4))
def test_ari_nmi_match_sklearn_and_purity_matches_loops(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 80))
  truth = rng.integers(0, int(rng.integers(1, 5)), n)
  pred = np.where(rng.random(n) < 0.6, truth * 7 + 3, rng.integers(0, 6, n))  # renamed + noise
  assert cluster.adjusted_rand_index(truth, pred) == pytest.approx(
      sk_metrics.adjusted_rand_score(truth, pred), abs=1e-12)
  assert cluster.normalized_mutual_info(truth, pred) == pytest.approx(
      sk_metrics.normalized_mutual_info_score(truth, pred), abs=1e-12)
  majority = sum(max(np.sum((pred == c) & (truth == g)) for g in set(truth)) for c in set(pred))
  assert cluster.purity(truth, pred) == pytest.approx(majority / n)


def test_scores_on_edge_partitions():
  one = np.zeros(5, int)
  singletons = np.arange(5)
  for a, b in [(one, one), (singletons, singletons), (one, singletons), (singletons, one)]:
    assert cluster.adjusted_rand_index(a, b) == pytest.approx(
        sk_metrics.adjusted_rand_score(a, b), abs=1e-12)
    assert cluster.normalized_mutual_info(a, b) == pytest.approx(
        sk_metrics.normalized_mutual_info_score(a, b), abs=1e-12)
  with pytest.raises(ValueError, match="equal length"):
    cluster.purity(one, singletons[:3])
