"""The retrieval ceiling from caption ambiguity, against exhaustive enumeration of rankings.

A tiny split (a few images, a few captions drawn from a handful of texts written with varying
case and spacing) is small enough to try every ranking a model could produce: for text->image,
every order of the images per distinct text; for image->text, every order of the distinct
texts per image, with identical captions necessarily tied (counted against the image, as
`metrics` counts ties) or, for the "random" rule, every order of the tied copies averaged.
The best R@k over all of them is the ceiling.
"""
import itertools

import fake_towers
import numpy as np
import pytest

from siglip_fair.evaluate import ceiling, metrics
from siglip_fair.evaluate import evaluators as ev

# Spellings of three texts: case and whitespace differ, the text does not.
SPELLINGS = (("a ball", "A ball", "a  ball "), ("a red car", "A Red car"), ("a tree",))


def _tiny_split(rng):
  num_images = int(rng.integers(1, 5))
  per_image = rng.integers(1, 4, num_images)
  if per_image.sum() > 6:  # keeps the instance orderings of the "random" rule enumerable
    per_image = np.minimum(per_image, 6 // num_images)
  text_of, texts, owner = [], [], []
  for i, n in enumerate(per_image):
    for _ in range(n):
      c = int(rng.integers(len(SPELLINGS)))
      spelling = SPELLINGS[c][rng.integers(len(SPELLINGS[c]))]
      text_of.append(c)
      texts.append(spelling.encode() if rng.random() < 0.5 else spelling)
      owner.append(i)
  return texts, np.array(text_of), np.array(owner), num_images


def _brute_t2i(text_of, owner, num_images, k):
  hits = 0
  for c in set(text_of.tolist()):
    queries = owner[text_of == c]
    hits += max(sum(order.index(o) < k for o in queries)
                for order in itertools.permutations(range(num_images)))
  return hits / len(owner)


def _brute_i2t(text_of, owner, num_images, k, ties):
  distinct = sorted(set(text_of.tolist()))
  best = []
  for i in range(num_images):
    value = 0.0
    for order in itertools.permutations(distinct):
      place = {c: p for p, c in enumerate(order)}
      if ties == "metric":
        # Score = −place; negatives scoring >= the best own caption rank ahead of it.
        top = min(place[c] for c in text_of[owner == i])
        rank = sum(place[c] <= top for c, o in zip(text_of, owner) if o != i)
        value = max(value, float(rank < k))
      else:
        # Every order of the caption copies that keeps the texts' order: ties shuffled.
        hits = []
        for perm in itertools.permutations(range(len(owner))):
          if all(place[text_of[a]] <= place[text_of[b]] for a, b in zip(perm, perm[1:])):
            first_own = min(p for p, j in enumerate(perm) if owner[j] == i)
            hits.append(first_own < k)
        value = max(value, float(np.mean(hits)))
    best.append(value)
  return float(np.mean(best))


@pytest.mark.parametrize("seed", range(40))
def test_ceilings_are_the_best_recall_over_every_ranking(seed):
  rng = np.random.default_rng(seed)
  texts, text_of, owner, num_images = _tiny_split(rng)
  for k in (1, 2, 3):
    assert ceiling.t2i_ceiling(texts, owner, num_images, k) == pytest.approx(
        _brute_t2i(text_of, owner, num_images, k)), k
    for ties in ceiling.TIES:
      assert ceiling.i2t_ceiling(texts, owner, num_images, k, ties) == pytest.approx(
          _brute_i2t(text_of, owner, num_images, k, ties)), (k, ties)
  out = ceiling.retrieval_ceilings(texts, owner, num_images, (1, 3))
  assert out == {"i2t_r1_ceiling": ceiling.i2t_ceiling(texts, owner, num_images, 1),
                 "i2t_r3_ceiling": ceiling.i2t_ceiling(texts, owner, num_images, 3),
                 "t2i_r1_ceiling": ceiling.t2i_ceiling(texts, owner, num_images, 1),
                 "t2i_r3_ceiling": ceiling.t2i_ceiling(texts, owner, num_images, 3)}


@pytest.mark.parametrize("seed", range(20))
def test_without_repeats_t2i_is_mean_min_k_over_m_and_random_ties_agree(seed):
  # Each image holds a text at most once: the ceiling is the mean over queries of
  # min(1, k / m_q), and for image -> text the random-tie value is at least the metric one.
  rng = np.random.default_rng(100 + seed)
  num_images, num_texts = int(rng.integers(2, 30)), int(rng.integers(1, 8))
  texts, owner = [], []
  for i in range(num_images):
    for c in rng.choice(num_texts, int(rng.integers(1, min(num_texts, 3) + 1)), replace=False):
      texts.append(f"Text  {c}" if rng.random() < 0.5 else f"text {c}")
      owner.append(i)
  owner = np.array(owner)
  key = [" ".join(t.lower().split()) for t in texts]
  for k in (1, 2, 5):
    m = [len({o for t, o in zip(key, owner) if t == q}) for q in key]
    assert ceiling.t2i_ceiling(texts, owner, num_images, k) == pytest.approx(
        np.mean([min(1.0, k / mq) for mq in m]))
    strict = ceiling.i2t_ceiling(texts, owner, num_images, k, "metric")
    assert strict <= ceiling.i2t_ceiling(texts, owner, num_images, k, "random") + 1e-12
    # A single own copy against o copies elsewhere: a hit with chance min(1, k / (o + 1)).
    loop = []
    for i in range(num_images):
      own = [t for t, o in zip(key, owner) if o == i]
      loop.append(max(min(1.0, k / (sum(t == c for t in key))) for c in own))
    assert ceiling.i2t_ceiling(texts, owner, num_images, k, "random") == pytest.approx(
        np.mean(loop))


@pytest.mark.parametrize("seed", range(20))
def test_no_embeddings_beat_the_ceiling(seed):
  # Random towers that, like any text tower, embed identical (normalised) captions alike.
  rng = np.random.default_rng(200 + seed)
  num_images, d = int(rng.integers(2, 25)), int(rng.integers(2, 6))
  owner = np.repeat(np.arange(num_images), rng.integers(1, 4, num_images))
  text_of = rng.integers(0, int(rng.integers(1, 6)), len(owner))
  texts = [f"A photo {c}" if rng.random() < 0.5 else f"a  photo {c}" for c in text_of]
  table = fake_towers.unit(rng.normal(size=(text_of.max() + 1, d)))
  images = fake_towers.unit(rng.normal(size=(num_images, d)))
  recalls = metrics.retrieval_recalls(images, table[text_of], owner, ks=(1, 2, 5))
  bounds = ceiling.retrieval_ceilings(texts, owner, num_images, (1, 2, 5))
  for name, value in recalls.items():
    assert value <= bounds[name + "_ceiling"] + 1e-12, name


def test_bad_inputs_are_explained():
  with pytest.raises(ValueError, match="one image per caption"):
    ceiling.t2i_ceiling(["a"], np.array([0, 1]), 2, 1)
  with pytest.raises(ValueError, match="k=0 must be >= 1"):
    ceiling.t2i_ceiling(["a"], np.array([0]), 1, 0)
  with pytest.raises(ValueError, match="at least one caption"):
    ceiling.i2t_ceiling(["a"], np.array([0]), 2, 1)
  with pytest.raises(ValueError, match="ties='first'"):
    ceiling.i2t_ceiling(["a"], np.array([0]), 1, 1, ties="first")


# ---------------------------------------------------------------- the evaluator ---

WORDS = {w: i for i, w in enumerate(("a", "photo", "of", "ball", "car", "tree", "red"))}


def _embed_images(params, images):
  pixels = np.round((images + 1.0) * 127.5).astype(np.int64).reshape(len(images), -1)
  index = pixels[:, 0]
  return params["images"][np.where(index < len(params["images"]), index, 0)]  # 0: padding


def _embed_texts(params, tokens):
  return fake_towers.unit(params["words"][tokens].sum(1))


def _image(index):
  flat = np.zeros(24, np.uint8)
  flat[0] = index
  return flat.reshape(2, 4, 3)


def test_evaluator_emits_the_ceiling_computed_once(monkeypatch):
  rng = np.random.default_rng(7)
  caps = [["A photo of a ball", "a photo of  a ball", "a red car"], ["a photo of a ball"],
          ["A Red Car", "a tree", "a tree"], ["a photo of a car"]]
  source = [{"image": _image(i), "captions": np.array([c.encode() for c in cs], object)}
            for i, cs in enumerate(caps)]
  context = ev.EvalContext(_embed_images, _embed_texts, fake_towers.BagOfWords(WORDS, 6),
                           {"retrieval": source}, batch_size=3)
  calls = []
  original = ceiling.retrieval_ceilings
  monkeypatch.setattr(ceiling, "retrieval_ceilings",
                      lambda *a, **kw: calls.append(1) or original(*a, **kw))
  evaluator = ev.build_evaluators({"retrieval": {"ks": (1, 2)}}, context)["retrieval"]
  assert len(calls) == 1
  text_of = {"a photo of a ball": 0, "a red car": 1, "a tree": 2, "a photo of a car": 3}
  key = np.array([text_of[" ".join(c.lower().split())] for cs in caps for c in cs])
  owner = np.repeat(np.arange(4), [len(c) for c in caps])
  outs = []
  for _ in range(2):  # two evaluations with different models: the ceilings do not move
    params = {"words": rng.normal(size=(len(WORDS) + 2, 5)),
              "images": fake_towers.unit(rng.normal(size=(4, 5)))}
    outs.append(dict(evaluator.run(params)))
  assert len(calls) == 1
  for k in (1, 2):
    for out in outs:
      assert out[f"retrieval/t2i_r{k}_ceiling"] == pytest.approx(_brute_t2i(key, owner, 4, k))
      assert out[f"retrieval/i2t_r{k}_ceiling"] == pytest.approx(
          _brute_i2t(key, owner, 4, k, "metric"))
      for d in ("i2t", "t2i"):
        assert out[f"retrieval/{d}_r{k}"] <= out[f"retrieval/{d}_r{k}_ceiling"]
  # By hand: "a photo of a ball" is held by images 0 (twice) and 1, so at k = 1 text->image
  # gets at most 2 of its 3 queries. Image->text: images 0 and 1 have no caption without a
  # copy elsewhere (a miss at k = 1), and image 1's only caption has two (a miss at k = 2).
  assert outs[0]["retrieval/t2i_r1_ceiling"] == pytest.approx((2 + 1 + 2 + 1) / 8)
  assert outs[0]["retrieval/i2t_r1_ceiling"] == pytest.approx(2 / 4)
  assert outs[0]["retrieval/i2t_r2_ceiling"] == pytest.approx(3 / 4)
