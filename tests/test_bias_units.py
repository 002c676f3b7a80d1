"""RB and AB in one unit, points (100 × a share or probability), everywhere they are reported.

The model-level evaluators run on random embeddings and temperatures and are checked against
brute-force numpy ×100 (points and bootstrap bounds, RB's share and smooth readings alike);
model- and data-level RB / AB are checked to be the same number when the model's preferences
are exactly the data's labels.
"""
import fake_towers
import numpy as np
import pytest

from siglip_fair.evaluate import data_bias
from siglip_fair.evaluate import evaluators as ev

D = 12
WORDS = {"man": 0, "woman": 1, "nurse": 2, "doctor": 3, "librarian": 4, "scientist": 5}
PAIRS = (("nurse", "doctor"), ("librarian", "scientist"))
BIAS_CONFIG = {"templates": ["{}"], "bootstrap": {"num_samples": 0}}


def _context(num_objects, genders):
  return fake_towers.bias_context(num_objects, genders, WORDS, 4)


def _params(word_vectors, image_emb, t):
  table = np.zeros((len(WORDS) + 2, D), np.float32)  # ids: 0 pad, 1.. sorted words, unknown
  for i, word in enumerate(sorted(WORDS)):
    table[i + 1] = word_vectors[WORDS[word]]
  return {"words": table, "images": np.asarray(image_emb, np.float32), "t": t}


def _evaluate(context, params, bootstrap=0):
  config = {"rb": {"type": "representation_bias", **BIAS_CONFIG,
                   "group_words": {"man": ["man"], "woman": ["woman"]}},
            "ab": {"type": "association_bias", **BIAS_CONFIG, "pairs": [list(p) for p in PAIRS]}}
  for sub in config.values():
    sub["bootstrap"] = {"num_samples": bootstrap, "seed": 3}
  return ev.run_all(ev.build_evaluators(config, context), params)


def _brute_points(obj, people, gender, words, t):
  """{metric: points} in float64 loops over images: RB (share and smooth readings), and AB
  per pair (probability and argmax readings) with their mean |gap|; gender 1 = woman,
  AB = woman − man."""
  out = {"bias/rb": 100 * (np.mean([o @ words[0] > o @ words[1] for o in obj]) - 0.5)}
  probs = []
  for o in obj:  # softmax over the two logits t · cosine, one image at a time
    logits = [t * float(o @ words[0]), t * float(o @ words[1])]
    probs.append(1.0 / (1.0 + np.exp(logits[1] - logits[0])))
  out["bias/rb_smooth"] = 100 * (np.mean(probs) - 0.5)
  for reading in ("ab", "ab_argmax"):
    gaps = []
    for a, b in PAIRS:
      gap = people @ (words[WORDS[a]] - words[WORDS[b]])
      pref = 1 / (1 + np.exp(-t * gap)) if reading == "ab" else (gap > 0).astype(float)
      gaps.append(100 * (pref[gender == 1].mean() - pref[gender == 0].mean()))
      out[f"bias/{reading}/{a}_{b}"] = gaps[-1]
    out[f"bias/{reading}_mean"] = np.mean(np.abs(gaps))
  return out


@pytest.mark.parametrize("seed", range(8))
def test_rb_and_ab_are_brute_force_points_on_random_embeddings(seed):
  rng = np.random.default_rng(seed)
  num_obj, num_people = int(rng.integers(5, 40)), int(rng.integers(6, 50))
  gender = rng.integers(0, 2, num_people)
  gender[:2] = (0, 1)
  words = fake_towers.unit(rng.normal(size=(len(WORDS), D)))
  images = fake_towers.unit(rng.normal(size=(num_obj + num_people, D)))
  t = float(rng.uniform(1, 30))
  out = _evaluate(_context(num_obj, gender), _params(words, images, t))
  want = _brute_points(images[:num_obj], images[num_obj:], gender, words, t)
  assert set(out) == set(want)
  for name, value in want.items():
    assert out[name] == pytest.approx(value, rel=1e-4, abs=1e-3), name


def test_bootstrap_bounds_are_points_too():
  rng = np.random.default_rng(11)
  num_obj, num_people = 30, 40
  gender = np.arange(num_people) % 2
  words = fake_towers.unit(rng.normal(size=(len(WORDS), D)))
  images = fake_towers.unit(rng.normal(size=(num_obj + num_people, D)))
  out = _evaluate(_context(num_obj, gender), _params(words, images, 5.0), bootstrap=40)
  # The evaluators resample rows with numpy's default_rng(seed).integers(0, n, (B, n)).
  obj_idx = np.random.default_rng(3).integers(0, num_obj, (40, num_obj))
  ppl_idx = np.random.default_rng(3).integers(0, num_people, (40, num_people))
  reps = [_brute_points(images[:num_obj][i], images[num_obj:][j], gender[j], words, 5.0)
          for i, j in zip(obj_idx, ppl_idx)]
  for name in ("bias/rb", "bias/rb_smooth", "bias/ab/nurse_doctor", "bias/ab_mean",
               "bias/ab_argmax_mean"):
    lo, hi = np.nanpercentile([r[name] for r in reps], [2.5, 97.5])
    assert out[name + "_lo"] == pytest.approx(lo, rel=1e-4, abs=1e-3), name
    assert out[name + "_hi"] == pytest.approx(hi, rel=1e-4, abs=1e-3), name


@pytest.mark.parametrize("seed", range(6))
def test_model_and_data_rb_ab_agree_when_preferences_are_the_labels(seed):
  # Closed form: object image i prefers "man" iff data example i is a man, and person j
  # prefers the pair's first occupation iff labelled with it. Model- and data-level RB / AB
  # then measure the same shares, so they must be the same number of points.
  rng = np.random.default_rng(seed)
  num_obj, num_people = int(rng.integers(4, 40)), int(rng.integers(6, 60))
  is_man = rng.random(num_obj) < rng.uniform(0.1, 0.9)
  gender = rng.integers(0, 2, num_people)
  gender[:2] = (0, 1)
  first = rng.random(num_people) < np.where(gender == 1, rng.uniform(), rng.uniform())
  words = np.eye(len(WORDS), D)
  noise = 0.1 * rng.normal(size=(num_obj + num_people, D))
  noise[:, :len(WORDS)] = 0  # off the word axes: distinct images, same preferences
  images = np.zeros((num_obj + num_people, D))
  images[np.arange(num_obj), np.where(is_man, 0, 1)] = 1
  people = np.arange(num_obj, num_obj + num_people)
  images[people, np.where(first, 2, 3)] = 1  # nurse vs doctor
  images[people, np.where(first, 4, 5)] = 1  # librarian vs scientist, the same choice
  out = _evaluate(_context(num_obj, gender), _params(words, fake_towers.unit(images + noise), 1.0))

  rb = 100 * (is_man.mean() - 0.5)
  ab = 100 * (first[gender == 1].mean() - first[gender == 0].mean())
  objects = data_bias.data_bias_metrics(
      {"s": np.stack([is_man, ~is_man], 1), "known": np.ones(num_obj),
       "y": np.zeros((num_obj, 2))},
      group_names=("man", "woman"), label_names=("nurse", "doctor"), pairs=[])
  persons = data_bias.data_bias_metrics(
      {"s": np.stack([gender == 0, gender == 1], 1), "known": np.ones(num_people),
       "y": np.stack([first, ~first], 1)},
      group_names=("man", "woman"), label_names=("nurse", "doctor"), pairs=[PAIRS[0]])
  assert out["bias/rb"] == pytest.approx(rb, abs=1e-4)
  assert objects["data/rb"] == pytest.approx(rb, abs=1e-9)
  for name in ("bias/ab_argmax/nurse_doctor", "bias/ab_argmax/librarian_scientist"):
    assert out[name] == pytest.approx(ab, abs=1e-4)
  assert persons["data/ab/nurse_doctor"] == pytest.approx(ab, abs=1e-9)
  assert persons["data/ab_mean"] == pytest.approx(abs(ab), abs=1e-9)


def test_no_per_evaluator_scale():
  # A `scale` knob per evaluator is how RB and AB ended up in different units; it is gone.
  context = _context(4, [0, 1])
  for kind in ("representation_bias", "association_bias"):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['scale'\]"):
      ev.build_evaluators({"x": {"type": kind, "scale": 1.0}}, context)
  with pytest.raises(TypeError, match="scale"):
    data_bias.data_bias_metrics({"s": np.ones((2, 2)), "known": np.ones(2),
                                 "y": np.ones((2, 2))}, group_names=("man", "woman"),
                                label_names=("nurse", "doctor"), pairs=[], scale=1.0)
