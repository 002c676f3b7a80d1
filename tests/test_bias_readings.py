"""RB's two readings (the paper's share and the smooth probability) and the prompt sets that
RB, AB and attribute accuracy ensemble over synonyms × templates.

The towers are fakes: an image tower that looks each image up in a table of random unit
vectors, and a bag-of-words text tower with a random vector for EVERY word, template words
included, so each template gives another prompt embedding. Expected values are computed in
float64 loops: render every prompt by hand, embed it, average per set, normalise, compare.
"""
import re

import fake_towers
import numpy as np
import pytest

from siglip_fair.evaluate import evaluators as ev

D = 10
GROUP_WORDS = {"man": ["man", "male", "gentleman"], "woman": ["woman", "female", "lady"]}
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "{}"]  # the defaults, written out
LABEL_WORDS = {"nurse": ["nurse", "midwife"], "doctor": ["doctor", "physician", "surgeon"],
               "receptionist": ["receptionist"], "executive": ["executive", "boss"]}
PAIRS = [("nurse", "doctor"), ("receptionist", "executive")]
VOCAB = sorted({"a", "an", "photo", "picture", "of", *(w for ws in GROUP_WORDS.values()
                                                       for w in ws),
                *(w for ws in LABEL_WORDS.values() for w in ws)})


def _context(num_objects, genders):
  return fake_towers.bias_context(num_objects, genders, {w: 0 for w in VOCAB}, 8)


def _params(word_vec, images, t):
  table = np.zeros((len(VOCAB) + 2, D))  # ids: 0 pad, 1.. sorted VOCAB, then unknown
  for i, word in enumerate(VOCAB):
    table[i + 1] = word_vec[word]
  return {"words": table, "images": np.asarray(images), "t": t}


def _prompt_set_embedding(words, templates, word_vec):
  """Every template × word prompt rendered by hand ("a" -> "an" before a vowel), embedded as
  the normalised sum of its words, then averaged and normalised (the CLIP ensemble)."""
  rows = []
  for word in words:
    for template in templates:
      text = template.replace("a {}", ("an {}" if word[0] in "aeiou" else "a {}"))
      text = text.replace("{}", word)
      vec = sum(word_vec[w] for w in re.findall(r"\w+", text.lower()))
      rows.append(vec / np.linalg.norm(vec))
  mean = np.mean(rows, 0)
  return mean / np.linalg.norm(mean)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _brute(obj, people, gender, word_vec, t, templates, group_words, label_words):
  """{metric: value}: RB (share, smooth), AB (probability, argmax) and gender accuracy."""
  man, woman = (_prompt_set_embedding(group_words[g], templates, word_vec)
                for g in ("man", "woman"))
  out = {"bias/rb": 100 * (np.mean([float(o @ man > o @ woman) for o in obj]) - 0.5),
         "bias/rb_smooth": 100 * (np.mean([_sigmoid(t * (o @ man - o @ woman))
                                           for o in obj]) - 0.5)}
  for reading in ("ab", "ab_argmax"):
    gaps = []
    for a, b in PAIRS:
      first = _prompt_set_embedding(label_words[a], templates, word_vec)
      second = _prompt_set_embedding(label_words[b], templates, word_vec)
      pref = [_sigmoid(t * (p @ first - p @ second)) if reading == "ab"
              else float(p @ first > p @ second) for p in people]
      pref = np.array(pref)
      gaps.append(100 * (pref[gender == 1].mean() - pref[gender == 0].mean()))
      out[f"bias/{reading}/{a}_{b}"] = gaps[-1]
    out[f"bias/{reading}_mean"] = np.mean(np.abs(gaps))
  out["bias/gender_acc"] = np.mean([float((p @ man > p @ woman) == (g == 0))
                                    for p, g in zip(people, gender)])
  return out


def _evaluate(context, params, config):
  for sub in config.values():
    sub["bootstrap"] = {"num_samples": 0}
  return ev.run_all(ev.build_evaluators(config, context), params)


def _random_world(seed):
  rng = np.random.default_rng(seed)
  num_obj, num_people = int(rng.integers(5, 60)), int(rng.integers(6, 60))
  gender = rng.integers(0, 2, num_people)
  gender[:2] = (0, 1)
  word_vec = {w: rng.normal(size=D) for w in VOCAB}
  images = fake_towers.unit(rng.normal(size=(num_obj + num_people, D)))
  t = float(np.exp(rng.uniform(np.log(0.5), np.log(100))))
  return num_obj, gender, word_vec, images, t


@pytest.mark.parametrize("seed", range(12))
def test_default_config_ensembles_synonyms_and_templates(seed):
  # The shipped defaults (default_evals_config), against the sets written out above.
  num_obj, gender, word_vec, images, t = _random_world(seed)
  config = ev.default_evals_config(["ball"], occupation_pairs=PAIRS)
  assert config.rb.group_words.to_dict() == GROUP_WORDS
  assert config.gender_acc.group_words.to_dict() == GROUP_WORDS
  assert list(config.rb.templates) == list(config.ab.templates) == TEMPLATES
  assert config.ab.label_words.to_dict() == {n: [n] for p in PAIRS for n in p}
  assert not config.rb.single_prompt and not config.ab.single_prompt
  config.ab.label_words = LABEL_WORDS  # a synonym set per occupation is a config field
  subs = {name: config[name].to_dict() for name in ("rb", "ab", "gender_acc")}
  out = _evaluate(_context(num_obj, gender), _params(word_vec, images, t), subs)
  want = _brute(images[:num_obj], images[num_obj:], gender, word_vec, t, TEMPLATES,
                GROUP_WORDS, LABEL_WORDS)
  assert set(out) >= set(want)
  for name, value in want.items():
    assert out[name] == pytest.approx(value, rel=1e-4, abs=1e-3), name


@pytest.mark.parametrize("seed", range(8))
def test_single_prompt_and_custom_sets_are_reachable(seed):
  num_obj, gender, word_vec, images, t = _random_world(50 + seed)
  context, params = _context(num_obj, gender), _params(word_vec, images, t)
  base = {"rb": {"type": "representation_bias", "group_words": GROUP_WORDS},
          "ab": {"type": "association_bias", "pairs": PAIRS, "label_words": LABEL_WORDS},
          "gender_acc": {"type": "attribute_accuracy", "group_words": GROUP_WORDS}}
  single = _evaluate(context, params, {k: {**v, "single_prompt": True, "templates": TEMPLATES}
                                       for k, v in base.items()})
  want = _brute(images[:num_obj], images[num_obj:], gender, word_vec, t, TEMPLATES[:1],
                {g: w[:1] for g, w in GROUP_WORDS.items()},
                {n: w[:1] for n, w in LABEL_WORDS.items()})
  for name, value in want.items():
    assert single[name] == pytest.approx(value, rel=1e-4, abs=1e-3), name
  custom = {"man": ["gentleman", "male"], "woman": ["lady"]}
  out = _evaluate(context, params, {k: {**v, "templates": TEMPLATES[1:],
                                        **({"group_words": custom} if "group_words" in v
                                           else {})} for k, v in base.items()})
  want = _brute(images[:num_obj], images[num_obj:], gender, word_vec, t, TEMPLATES[1:], custom,
                LABEL_WORDS)
  for name, value in want.items():
    assert out[name] == pytest.approx(value, rel=1e-4, abs=1e-3), name


def _rb(context, params):
  return _evaluate(context, params, {"rb": {"type": "representation_bias",
                                            "group_words": {"man": ["man"],
                                                            "woman": ["woman"]},
                                            "templates": ["{}"]}})


def _axes():
  """Word vectors with man = e0 + e2, woman = e0 − e2 (unit after normalising)."""
  word_vec = {w: np.zeros(D) for w in VOCAB}
  word_vec["man"][[0, 2]] = (1.0, 1.0)
  word_vec["woman"][[0, 2]] = (1.0, -1.0)
  return word_vec


@pytest.mark.parametrize("lean", [1, -1])
def test_share_and_smooth_agree_in_sign_on_a_constructed_lean(lean):
  # 70 % of object images lean to `lean`'s group by a clear margin, 30 % to the other by a
  # smaller one: both readings must point the same way, and the smooth one must be the
  # closed form 100 · (0.7 σ(t·g1) + 0.3 σ(−t·g2) − 0.5) with g = sim(man) − sim(woman).
  rng = np.random.default_rng(3)
  t, big, small = 8.0, 0.4, 0.1
  side = np.where(np.arange(100) < 70, lean * big, -lean * small)
  images = np.zeros((100, D))
  images[:, 0], images[:, 2] = 1.0, side
  images[:, 4:] = 0.05 * rng.normal(size=(100, D - 4))  # off the prompt axes
  images = fake_towers.unit(images)
  out = _rb(_context(100, [0, 1]), _params(_axes(), np.concatenate([images, images[:2]]), t))
  gap = images @ (np.eye(D)[2] * np.sqrt(2))  # sim(man) − sim(woman) = √2 · x_2
  assert np.sign(out["bias/rb"]) == np.sign(out["bias/rb_smooth"]) == lean
  assert out["bias/rb"] == pytest.approx(lean * 20.0)
  assert out["bias/rb_smooth"] == pytest.approx(100 * (_sigmoid(t * gap).mean() - 0.5),
                                                rel=1e-4)


@pytest.mark.parametrize("seed", range(10))
def test_smooth_rb_is_continuous_where_the_share_jumps(seed):
  # Near-identical images: one content vector plus a tiny common group direction δ·e2. As δ
  # crosses 0 every image flips at once and the share jumps by 100 points; the smooth reading
  # moves by at most 100 · t/4 · max|Δgap| (σ' <= 1/4), a tiny amount.
  rng = np.random.default_rng(seed)
  t = float(rng.uniform(1, 100))
  content = rng.normal(size=D)
  content[2] = 0.0
  noise = 1e-3 * rng.normal(size=(40, D))
  noise[:, 2] = 0.0
  context = _context(40, [0, 1])
  readings = []
  for delta in (-1e-5, 1e-5):
    images = fake_towers.unit(content + noise + delta * np.eye(D)[2])
    gap = images @ (np.eye(D)[2] * np.sqrt(2))
    readings.append((_rb(context, _params(_axes(), np.concatenate([images, images[:2]]), t)),
                     gap))
  (before, gap0), (after, gap1) = readings
  assert after["bias/rb"] - before["bias/rb"] == pytest.approx(100.0)
  jump = after["bias/rb_smooth"] - before["bias/rb_smooth"]
  assert 0 < jump <= 100 * t / 4 * np.max(np.abs(gap1 - gap0)) * (1 + 1e-3) + 1e-4
  assert abs(before["bias/rb_smooth"]) < 1.0 and abs(after["bias/rb_smooth"]) < 1.0
