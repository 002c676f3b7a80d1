"""Merging identical rows for M4's exact phases: counts against a brute-force tally, and the
same duals, q and card with the merge on and off."""
import collections

import jax
import numpy as np
import pytest

from siglip_fair.balance import dual, m4, merge, stream


def _examples(n, seed, utility=False):
  rng = np.random.default_rng(seed)
  known = (rng.random(n) < 0.8).astype(np.float32)
  woman = (rng.random(n) < 0.4).astype(np.float32)
  s = np.stack([1 - woman, woman], 1) * known[:, None]
  y = (rng.random((n, 3)) < 0.2).astype(np.float32)
  w = (rng.random((n, 2)) < 0.1).astype(np.float32)
  u = rng.random(n).astype(np.float32) if utility else np.zeros(n, np.float32)
  return m4.Examples(s, np.repeat(known[:, None], 2, 1), y, w, u)


def test_counts_equal_a_brute_force_tally_and_padding_weighs_nothing():
  ex = _examples(5000, seed=0)
  rows, weights = merge.merge_identical(ex)
  tally = collections.Counter(
      tuple(np.concatenate([np.ravel(x[i]) for x in ex])) for i in range(5000))
  real = weights > 0
  got = {tuple(np.concatenate([np.ravel(x[i]) for x in rows])): weights[i]
         for i in np.flatnonzero(real)}
  assert got == tally and weights.sum() == 5000
  assert all(np.all(np.asarray(x)[~real] == 0) for x in rows)
  # 8 sizes per octave: shapes repeat across samples of similar diversity.
  k = len(tally)
  assert k <= len(weights) < k * 1.125 + 1


def test_hash_collisions_fall_back_to_sorting_the_keys(monkeypatch):
  # Every row hashing alike is the worst case: runs must still be one per distinct row.
  ex = _examples(3000, seed=4)
  expected = merge.merge_identical(ex)
  monkeypatch.setattr(merge, "_hash", lambda keys: np.zeros(len(keys), np.uint64))
  rows, weights = merge.merge_identical(ex)
  key = lambda r, i: tuple(np.concatenate([np.ravel(x[i]) for x in r]))
  got = collections.Counter({key(rows, i): weights[i] for i in np.flatnonzero(weights)})
  want = collections.Counter({key(expected[0], i): expected[1][i]
                              for i in np.flatnonzero(expected[1])})
  assert got == want and len(weights) == len(expected[1])


def test_distinct_rows_are_not_merged():
  # A continuous utility makes every row distinct: nothing to gain, so no merge.
  assert merge.merge_identical(_examples(2000, seed=1, utility=True)) is None


@pytest.mark.parametrize("use_utility", [False, True])
def test_solve_and_stream_agree_with_the_merge_on_and_off(use_utility):
  ex = _examples(6000, seed=2, utility=use_utility)
  ann = dict(s=ex.s, known=ex.known[:, 0], y=ex.y, w=ex.w, u=ex.u)
  results = {}
  for on in (False, True):
    cfg = m4.default_config()
    cfg.eta, cfg.use_proxies, cfg.use_utility = 0.6, True, use_utility
    cfg.optim.sample_size, cfg.optim.polish_size, cfg.optim.chunk_size = 1024, 4096, 2048
    cfg.optim.merge_identical = on
    results[on] = stream.balance_stream(ann, cfg, jax.random.key(0))
  off, on = results[False], results[True]
  np.testing.assert_allclose(on.q, off.q, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), on.duals["v"],
               off.duals["v"])
  merged = on.card["solved_on"]
  if use_utility:
    assert merged["polish_rows"] == 4096  # nothing merged
  else:
    assert merged["exact_rows"] < 1024 and merged["polish_rows"] < 4096 // 2


def test_weighted_layout_normalises_by_the_examples_it_stands_for():
  ex = _examples(3000, seed=3)
  cfg = m4.default_config()
  pi = np.array([0.6, 0.4], np.float32)
  plain = dual.make_layout(3000, cfg)
  rows, weights = merge.merge_identical(ex)
  weighted = dual.make_layout(len(rows.u), cfg, total=3000)
  a = dual.jacobi(*dual.to_blocks(ex, plain), pi, layout=plain)
  b = dual.jacobi(*dual.to_blocks(rows, weighted, weights), pi, layout=weighted)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), a, b)
