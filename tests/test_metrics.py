"""Quality metrics (zero-shot, retrieval), prompt sets and bootstrap intervals
against brute-force Python loops."""
import numpy as np
import pytest

from siglip_fair.evaluate import metrics, prompts
from siglip_fair.evaluate.bootstrap import bootstrap_ci


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _loop_rank(scores, positives):
  """Position of the first positive after sorting, negatives winning ties."""
  order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in positives))
  return next(r for r, j in enumerate(order) if j in positives)


# ---------------------------------------------------------------- prompts ---

def test_prompt_sets_expand_every_word_and_template_with_articles():
  texts, spans = prompts.prompt_sets(
      {"man": ["man", "male"], "exec": ["executive"]}, ("a photo of a {}.", "{}"))
  assert texts == ["a photo of a man.", "man", "a photo of a male.", "male",
                   "a photo of an executive.", "executive"]
  assert [texts[s] for s in spans] == [texts[:4], texts[4:]]
  with pytest.raises(ValueError, match="single"):
    prompts.expand("man", ("{}",))
  with pytest.raises(ValueError, match="placeholder"):
    prompts.render("no placeholder", "x")


def test_prompt_ensemble_is_renormalised_mean_of_normalised_rows():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(5, 3)) * rng.uniform(0.5, 3, size=(5, 1))
  out = metrics.prompt_ensemble(emb, [slice(0, 2), slice(2, 5)])
  for row, rows in zip(out, (emb[:2], emb[2:])):
    mean = sum(r / np.linalg.norm(r) for r in rows) / len(rows)
    np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5)


# -------------------------------------------------------------- zero-shot ---

def test_zeroshot_topk_matches_loops():
  rng = np.random.default_rng(1)
  img, cls = _unit(rng, 60, 8), _unit(rng, 7, 8)
  labels = rng.integers(0, 7, 60)
  acc = metrics.zeroshot_accuracy(img, cls, labels, ks=(1, 5, 10))
  for k in (1, 5, 10):
    hits = [_loop_rank(list(img[i] @ cls.T), {labels[i]}) < k for i in range(60)]
    assert acc[k] == pytest.approx(np.mean(hits))
  assert acc[10] == 1.0  # k clipped to the 7 classes
  assert 0 < acc[1] < acc[5] < 1


@pytest.mark.parametrize("chunk_size", [1, 7, 60, 1000])
def test_zeroshot_chunks_match_the_unchunked_loop(chunk_size):
  rng = np.random.default_rng(2)
  img, cls = _unit(rng, 60, 8), _unit(rng, 9, 8)
  img[5] = cls[3]  # an exact hit, and a tie between two classes below
  cls[4] = cls[3]
  labels = rng.integers(0, 9, 60)
  labels[5] = 3
  expected = [_loop_rank(list(img[i] @ cls.T), {labels[i]}) for i in range(60)]
  np.testing.assert_array_equal(metrics.zeroshot_ranks(img, cls, labels, chunk_size),
                                expected)
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.zeroshot_ranks(img, cls, labels, 0)


def test_zeroshot_ties_count_against_and_collapse_scores_zero():
  img = np.array([[1.0, 0.0], [0.0, 1.0]])
  cls = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 tie
  np.testing.assert_array_equal(
      metrics.zeroshot_ranks(img, cls, np.array([0, 2])), [1, 0])
  collapsed = metrics.zeroshot_accuracy(np.ones((4, 2)), np.ones((3, 2)),
                                        np.array([0, 1, 2, 0]), ks=(1,))
  assert collapsed[1] == 0.0


def test_zeroshot_rejects_bad_labels_and_widths():
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    metrics.zeroshot_ranks(np.ones((2, 4)), np.ones((3, 4)), np.array([0, -1]))
  with pytest.raises(ValueError, match="width"):
    metrics.zeroshot_ranks(np.ones((2, 5)), np.ones((3, 4)), np.array([0, 1]))


# -------------------------------------------------------------- retrieval ---

def test_retrieval_planted_permutation_is_perfect():
  rng = np.random.default_rng(2)
  n, k = 12, 3
  perm = rng.permutation(n)
  img = _unit(rng, n, 16)
  text_image = np.repeat(perm, k)  # captions grouped by a shuffled image order
  txt = metrics.l2_normalize(img[text_image] + 0.01 * rng.normal(size=(n * k, 16)))
  rec = metrics.retrieval_recalls(img, txt, text_image, chunk_size=5)
  assert all(v == 1.0 for v in rec.values()), rec


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_retrieval_recalls_match_loops(chunk_size):
  rng = np.random.default_rng(3)
  n, k = 20, 3
  img = _unit(rng, n, 6)
  text_image = rng.permutation(np.repeat(np.arange(n), k))
  txt = metrics.l2_normalize(img[text_image] + 0.8 * rng.normal(size=(n * k, 6)))
  sims = img @ txt.T
  rec = metrics.retrieval_recalls(img, txt, text_image, ks=(1, 5, 10),
                                  chunk_size=chunk_size)
  for kk in (1, 5, 10):
    i2t = [_loop_rank(list(sims[i]), set(np.flatnonzero(text_image == i))) < kk
           for i in range(n)]
    t2i = [_loop_rank(list(sims[:, j]), {text_image[j]}) < kk
           for j in range(n * k)]
    assert rec[f"i2t_r{kk}"] == pytest.approx(np.mean(i2t))
    assert rec[f"t2i_r{kk}"] == pytest.approx(np.mean(t2i))
  assert 0 < rec["i2t_r1"] < 1 and 0 < rec["t2i_r1"] < 1


def test_retrieval_any_caption_counts_and_ties_go_to_negatives():
  img = np.array([[1.0, 0.0], [0.0, 1.0]])
  # Image 0: one bad caption and one perfect one; image 1: a caption tied with
  # image 0's perfect caption.
  txt = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  text_image = np.array([0, 0, 1])
  np.testing.assert_array_equal(metrics.i2t_ranks(img, txt, text_image), [1, 2])
  np.testing.assert_array_equal(metrics.t2i_ranks(img, txt, text_image), [1, 0, 1])
  with pytest.raises(ValueError, match="no caption"):
    metrics.i2t_ranks(img, txt[:2], text_image[:2])


# -------------------------------------------------------------- bootstrap ---

def test_bootstrap_matches_slow_loop_and_covers_truth():
  rng = np.random.default_rng(4)
  x = rng.normal(0.3, 1.0, size=400)
  point, lo, hi = bootstrap_ci(lambda a: a.mean(-1), x, seed=7,
                               num_samples=500, batch_size=64)
  idx = np.random.default_rng(7).integers(0, 400, (500, 400))
  slow = [np.mean([x[j] for j in row]) for row in idx]
  assert point == pytest.approx(x.mean())
  assert lo == pytest.approx(np.percentile(slow, 2.5))
  assert hi == pytest.approx(np.percentile(slow, 97.5))
  assert lo < 0.3 < hi
  # Width close to the normal-theory 2 * 1.96 * sigma / sqrt(n).
  assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.2)


def test_bootstrap_resamples_rows_jointly_and_handles_vectors():
  rng = np.random.default_rng(5)
  a = rng.normal(size=50)
  b = 2 * a  # joint resampling keeps b == 2a in every replicate

  def stat(x, y):
    return np.stack([x.mean(-1), (y - 2 * x).max(-1)], -1)

  point, lo, hi = bootstrap_ci(stat, a, b, seed=0, num_samples=200)
  assert point.shape == lo.shape == hi.shape == (2,)
  np.testing.assert_allclose([point[1], lo[1], hi[1]], 0.0, atol=1e-12)
  assert lo[0] < point[0] < hi[0]
  with pytest.raises(ValueError, match="row axis"):
    bootstrap_ci(stat, a, b[:10])
  with pytest.raises(ValueError, match="alpha"):
    bootstrap_ci(lambda x: x.mean(-1), a, alpha=1.5)
