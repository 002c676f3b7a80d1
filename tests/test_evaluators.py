"""Evaluators end to end with fake towers on small in-memory splits.

The fake image tower reads a planted vector out of the pixels (undoing the
[-1, 1] normalisation, so a wrong preprocessing breaks it); the fake text tower
is a bag of words with one axis per known word. Expected values are planted or
recomputed with brute-force loops.
"""
import fake_towers
import ml_collections
import numpy as np
import pytest

from siglip_fair.evaluate import evaluators as ev

D = 16
AXIS = {"man": 0, "male": 0, "gentleman": 0, "woman": 1, "female": 1, "lady": 1,
        "nurse": 2, "doctor": 3, "librarian": 4, "scientist": 5,
        "cat": 6, "dog": 7, "car": 8, **{f"obj{i}": 9 + i for i in range(7)}}
BATCH = 8


def BagOfWords():  # noqa: N802 (a factory standing in for the class)
  return fake_towers.BagOfWords(AXIS, 12)


_unit = fake_towers.unit


def _word_table():
  return fake_towers.word_table(AXIS, D)


class FakeTowers:
  """Embedders that record every batch shape they are called with."""

  def __init__(self):
    self.shapes = []

  def embed_images(self, params, images):
    self.shapes.append(images.shape)
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1
    pixels = (images + 1.0) * 127.5
    real = np.any(images != 0, axis=(1, 2, 3))  # padding rows are all zero
    # Exact uint8 values come back only if preprocessing mapped [0, 255] to [-1, 1].
    np.testing.assert_allclose(pixels[real], np.round(pixels[real]), atol=1e-3)
    return _unit(np.round(pixels).reshape(len(images), -1)[:, :D] / 255.0)

  def embed_texts(self, params, tokens):
    self.shapes.append(tokens.shape)
    return _unit(params["words"][tokens].sum(1))


def _image(pixels):
  """uint8 [2, 4, 3] image whose first D values are `pixels` (dict axis -> p)."""
  flat = np.zeros(24, np.uint8)
  for axis, p in pixels.items():
    flat[axis] = p
  return flat.reshape(2, 4, 3)


def _objects():
  records = []
  # 14 of 21 images prefer "man" (axis 0); 3 classes, 1 in 4 misclassified;
  # the last image is unlabelled (left out of zero-shot, kept for RB).
  for i in range(21):
    label = i % 3 if i < 20 else -1
    wrong = (label + 1) % 3
    cls = {6 + label: 200, 6 + wrong: 255} if i % 4 == 0 else {6 + label: 255, 6 + wrong: 200}
    records.append({"image": _image({0: 90 if i < 14 else 30, 1: 60, **cls}),
                    "object_label": np.int32(label), "kind": np.int32(0)})
  return records


def _people():
  records = []
  for gender, n, k0, k1 in ((1, 10, 8, 5), (0, 10, 3, 5)):
    for i in range(n):
      occ = {2: 200 if i < k0 else 100, 3: 100 if i < k0 else 200,
             4: 200 if i < k1 else 100, 5: 100 if i < k1 else 200}
      # Gender recognised for 9 of 10 images per group.
      g = {gender: 150, 1 - gender: 50} if i != 9 else {gender: 50, 1 - gender: 150}
      records.append({"image": _image({**occ, **g}), "gender": np.int32(gender)})
  return records


def _retrieval(rng):
  records = []
  for _ in range(11):
    pixels = rng.integers(0, 256, 7)
    # Each caption names the image's strongest object and a random one.
    caps = [f"a photo of obj{pixels.argmax()} and obj{rng.integers(7)}"
            for _ in range(3)]
    records.append({
        "image": _image({9 + a: p for a, p in enumerate(pixels)}),
        "captions": np.array([c.encode() for c in caps], dtype=object)})
  return records


def _context(towers, rng=None):
  sources = {"objects": _objects(), "people": _people(),
             "retrieval": _retrieval(rng or np.random.default_rng(0))}
  return ev.EvalContext(towers.embed_images, towers.embed_texts, BagOfWords(),
                        sources, batch_size=BATCH, temperature=lambda params: params["t"])


def _config(num_bootstrap=200):
  config = ev.default_evals_config(
      ["cat", "dog", "car"], occupation_pairs=[("nurse", "doctor"),
                                               ("librarian", "scientist")],
      num_bootstrap=num_bootstrap)
  config.zeroshot.ks = (1, 2)
  return config


def test_all_evaluators_yield_planted_values_with_fixed_batches():
  towers = FakeTowers()
  context = _context(towers)
  params = {"words": _word_table(), "t": 7.0}
  out = ev.run_all(ev.build_evaluators(_config(), context), params)

  assert out["zeroshot/top1"] == pytest.approx(15 / 20)
  assert out["zeroshot/top2"] == pytest.approx(1.0)
  assert out["bias/rb"] == pytest.approx(100 * (14 / 21 - 0.5))
  assert out["bias/ab_argmax/nurse_doctor"] == pytest.approx(100 * (0.8 - 0.3))
  assert out["bias/ab_argmax/librarian_scientist"] == pytest.approx(0.0)
  assert out["bias/ab_argmax_mean"] == pytest.approx(25.0)
  # The probability reading, by brute force: softmax over the two prompts at t = 7.
  people = context.sources["people"]
  img = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in people])
  gender = np.array([r["gender"] for r in people])
  expected = []
  for a, b in ((2, 3), (4, 5)):  # word axes of (nurse, doctor), (librarian, scientist)
    prob = np.exp(7 * img[:, a]) / (np.exp(7 * img[:, a]) + np.exp(7 * img[:, b]))
    expected.append(100 * (prob[gender == 1].mean() - prob[gender == 0].mean()))
  assert out["bias/ab/nurse_doctor"] == pytest.approx(expected[0], rel=1e-4)
  assert out["bias/ab/librarian_scientist"] == pytest.approx(expected[1], abs=1e-4)
  assert out["bias/ab_mean"] == pytest.approx(np.mean(np.abs(expected)), rel=1e-4)
  assert 0 < out["bias/ab/nurse_doctor"] < out["bias/ab_argmax/nurse_doctor"]
  assert out["bias/gender_acc"] == pytest.approx(0.9)
  assert out["bias/gender_acc/man"] == out["bias/gender_acc/woman"] == pytest.approx(0.9)
  assert out["bias/gender_acc_worst"] == pytest.approx(0.9)
  assert out["bias/gender_acc_gap"] == pytest.approx(0.0, abs=1e-12)
  for name in ("zeroshot/top1", "bias/rb", "bias/ab/nurse_doctor", "bias/ab_mean",
               "bias/ab_argmax_mean", "bias/gender_acc"):
    assert out[name + "_lo"] <= out[name] <= out[name + "_hi"], name
  assert out["bias/rb_lo"] < out["bias/rb_hi"]
  assert {k for k in out if k.startswith("retrieval/")} == {
      f"retrieval/{d}_r{k}{c}" for d in ("i2t", "t2i") for k in (1, 5, 10)
      for c in ("", "_ceiling")}
  # RB's smooth reading, by brute force: P("man") at t = 7 over the 21 object images (the
  # bag of words puts every synonym of a group on its axis, so the ensemble is that axis).
  objects = context.sources["objects"]
  obj = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in objects])
  smooth = np.mean([1 / (1 + np.exp(7 * (o[1] - o[0]))) for o in obj])
  assert out["bias/rb_smooth"] == pytest.approx(100 * (smooth - 0.5), rel=1e-4)
  assert out["bias/rb_smooth_lo"] <= out["bias/rb_smooth"] <= out["bias/rb_smooth_hi"]
  # Every embedder call had the fixed batch size (text rows are [BATCH, 12]).
  assert {s[0] for s in towers.shapes} == {BATCH}


def test_retrieval_evaluator_matches_brute_force_loops():
  rng = np.random.default_rng(1)
  towers = FakeTowers()
  context = _context(towers, rng)
  evaluator = ev.build_evaluators({"retrieval": {"ks": (1, 3)}}, context)
  out = dict(evaluator["retrieval"].run({"words": _word_table()}))

  records = context.sources["retrieval"]
  img = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in records])
  texts, owner = [], []
  for i, r in enumerate(records):
    texts += [c.decode() for c in r["captions"]]
    owner += [i] * len(r["captions"])
  txt = _unit([[sum(AXIS.get(w) == a for w in t.split()) for a in range(D)] for t in texts])
  sims = img @ txt.T
  for k in (1, 3):
    i2t = [sum(sims[i, j] >= max(sims[i, jj] for jj in range(len(texts)) if owner[jj] == i)
               for j in range(len(texts)) if owner[j] != i) < k for i in range(len(img))]
    t2i = [sum(sims[i, j] >= sims[owner[j], j] for i in range(len(img)) if i != owner[j]) < k
           for j in range(len(texts))]
    assert out[f"retrieval/i2t_r{k}"] == pytest.approx(np.mean(i2t))
    assert out[f"retrieval/t2i_r{k}"] == pytest.approx(np.mean(t2i))
  assert 0 < out["retrieval/i2t_r1"] < 1 and 0 < out["retrieval/t2i_r1"] < 1


def test_bootstrap_off_and_empty_group():
  towers = FakeTowers()
  context = _context(towers)
  context.sources["people"][:] = [r for r in context.sources["people"]
                                  if r["gender"] == 0]  # no women left
  config = {"ab": {"type": "association_bias", "pairs": [["nurse", "doctor"]],
                   "bootstrap": {"num_samples": 0}}}
  out = ev.run_all(ev.build_evaluators(config, context), {"words": _word_table(), "t": 1.0})
  assert set(out) == {"bias/ab/nurse_doctor", "bias/ab_mean", "bias/ab_argmax/nurse_doctor",
                      "bias/ab_argmax_mean"}
  assert np.isnan(out["bias/ab_mean"]) and np.isnan(out["bias/ab_argmax_mean"])


def test_config_errors_are_explained():
  context = _context(FakeTowers())
  with pytest.raises(ValueError, match="unknown config key.*'clases'"):
    ev.build_evaluators({"zeroshot": {"clases": ["cat"]}}, context)
  with pytest.raises(ValueError, match="known types"):
    ev.build_evaluators({"foo": {}}, context)
  with pytest.raises(ValueError, match="needs split 'valid'"):
    ev.build_evaluators({"rb": {"type": "representation_bias", "split": "valid"}},
                        context)
  no_t = ev.EvalContext(context.embed_images, context.embed_texts, context.tokenizer,
                        context.sources, batch_size=BATCH)
  with pytest.raises(ValueError, match="needs the model's temperature"):
    ev.build_evaluators({"ab": {"type": "association_bias"}}, no_t)
  with pytest.raises(ValueError, match="RepresentationBias needs the model's temperature"):
    ev.build_evaluators({"rb": {"type": "representation_bias"}}, no_t)
  with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
    ev.build_evaluators({"rb": {"type": "representation_bias", "temperature": 0.0}}, no_t)
  fixed = ev.build_evaluators({"ab": {"type": "association_bias", "temperature": 3.0,
                                      "pairs": [["nurse", "doctor"]]},
                               "rb": {"type": "representation_bias", "temperature": 3.0}},
                              no_t)
  fixed_out = ev.run_all(fixed, {"words": _word_table()})
  assert np.isfinite(fixed_out["bias/ab_mean"]) and np.isfinite(fixed_out["bias/rb_smooth"])
  with pytest.raises(ValueError, match="needs `classes`"):
    ev.build_evaluators({"zeroshot": {}}, context)
  twice = ml_collections.ConfigDict({"a": {"type": "representation_bias"},
                                     "b": {"type": "representation_bias"}})
  with pytest.raises(ValueError, match="already produced"):
    ev.run_all(ev.build_evaluators(twice, context), {"words": _word_table(), "t": 1.0})
  on_objects = ev.build_evaluators(
      {"ab": {"type": "association_bias", "split": "objects"}}, context)
  with pytest.raises(ValueError, match=r"no field\(s\) \['gender'\]"):
    ev.run_all(on_objects, {"words": _word_table()})
  with pytest.raises(ValueError, match="uint8"):
    ev.preprocess_images(np.zeros((2, 2, 3), np.float32))


def test_retrieval_skew_matches_brute_force_ranking():
  context = _context(FakeTowers())
  params = {"words": _word_table()}
  config = {"skew": {"type": "retrieval_skew", "queries": ["nurse", "scientist"],
                     "ks": (1, 5, 100)}}
  out = ev.run_all(ev.build_evaluators(config, context), params)
  people = context.sources["people"]
  img = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in people])
  gender = np.array([r["gender"] for r in people])
  prior = np.bincount(gender, minlength=2) / len(gender)
  for k in (1, 5, 100):
    skews, ndkls = [], []
    for axis in (2, 5):  # the bag-of-words query embedding is the word's own axis
      order = sorted(range(len(img)), key=lambda i: (-img[i, axis], i))
      top = order[:min(k, len(img))]
      share = np.bincount(gender[top], minlength=2) / len(top)
      skews.append(max(np.log(share[g] / prior[g]) for g in range(2) if share[g] > 0))
      kl = []
      for i in range(1, len(top) + 1):
        p = np.bincount(gender[top[:i]], minlength=2) / i
        kl.append(sum(p[g] * np.log(p[g] / prior[g]) for g in range(2) if p[g] > 0))
      weights = 1 / np.log2(np.arange(2, len(top) + 2))
      ndkls.append(np.sum(weights * kl) / np.sum(weights))
    assert out[f"bias/maxskew@{k}"] == pytest.approx(np.mean(skews)), k
    assert out[f"bias/maxskew@{k}_max"] == pytest.approx(np.max(skews)), k
    assert out[f"bias/ndkl@{k}"] == pytest.approx(np.mean(ndkls)), k
  assert out["bias/maxskew@100"] == pytest.approx(0.0, abs=1e-12)  # k > set: all images
  assert out["bias/maxskew@5"] > 0
  with pytest.raises(ValueError, match="explicit `ks`"):
    ev.build_evaluators({"skew": {"type": "retrieval_skew", "queries": ["nurse"]}}, context)


def test_zero_shot_interval_over_templates_spans_the_template_ensembles():
  # Templates that name an object pull every image towards that class, so the accuracy
  # depends on which templates the ensemble draws.
  context = _context(FakeTowers())
  params = {"words": _word_table()}
  templates = ["a photo of a {}.", "a {} next to a cat.", "a {} next to a dog."]
  config = {"zeroshot": {"classes": ["cat", "dog", "car"], "templates": templates,
                         "ks": (1,), "template_bootstrap": 300,
                         "bootstrap": {"num_samples": 0}}}
  out = ev.run_all(ev.build_evaluators(config, context), params)
  # Brute force: the accuracy of the ensemble of every multiset of 3 templates.
  objects = [r for r in context.sources["objects"] if r["object_label"] >= 0]
  img = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in objects])
  labels = np.array([r["object_label"] for r in objects])

  def embed(text):
    return _unit([[sum(AXIS.get(w.strip(".")) == a for w in text.split()) for a in range(D)]])[0]

  accuracies = set()
  for a in range(3):
    for b in range(a, 3):
      for c in range(b, 3):
        classes = _unit([sum(embed(templates[t].format(name)) for t in (a, b, c))
                         for name in ("cat", "dog", "car")])
        accuracies.add(round(float(np.mean(np.argmax(img @ classes.T, 1) == labels)), 6))
  lo, hi = out["zeroshot/top1_tpl_lo"], out["zeroshot/top1_tpl_hi"]
  assert round(lo, 6) in accuracies and round(hi, 6) in accuracies
  assert lo <= out["zeroshot/top1"] <= hi and lo < hi


def test_results_as_json_rows():
  rows = ev.as_rows({"zeroshot/top1": 0.5, "zeroshot/top1_lo": 0.4, "zeroshot/top1_hi": 0.6,
                     "zeroshot/top1_tpl_lo": 0.45, "zeroshot/top1_tpl_hi": 0.55,
                     "bias/rb": 3.0, "step": 10})
  assert rows == [
      {"metric": "bias/rb", "value": 3.0, "lo": None, "hi": None, "tpl_lo": None,
       "tpl_hi": None},
      {"metric": "step", "value": 10, "lo": None, "hi": None, "tpl_lo": None, "tpl_hi": None},
      {"metric": "zeroshot/top1", "value": 0.5, "lo": 0.4, "hi": 0.6, "tpl_lo": 0.45,
       "tpl_hi": 0.55}]


def test_retrieval_skew_convention_is_a_named_option():
  context = _context(FakeTowers())
  params = {"words": _word_table()}
  base = {"type": "retrieval_skew", "queries": ["nurse", "scientist"], "ks": (1, 3)}
  exact = ev.run_all(ev.build_evaluators({"s": base}, context), params)
  dvl = ev.run_all(ev.build_evaluators(
      {"s": {**base, "convention": "debias_vision_lang"}}, context), params)
  # The smoothed MaxSkew is another quantity with its own name; NDKL is the same under both.
  assert set(dvl) == {f"bias/{m}@{k}{s}" for m in ("maxskew_dvl", "ndkl") for k in (1, 3)
                      for s in ("", "_max")}
  people = context.sources["people"]
  img = _unit([r["image"].reshape(-1)[:D] / 255.0 for r in people])
  gender = np.array([r["gender"] for r in people])
  prior = np.bincount(gender, minlength=2) / len(gender)
  for k in (1, 3):
    skews = []
    for axis in (2, 5):
      top = sorted(range(len(img)), key=lambda i: (-img[i, axis], i))[:k]
      share = np.maximum(np.bincount(gender[top], minlength=2), 1) / k  # absent: 1/k
      skews.append(max(0.0, *(np.log(share[g] / prior[g]) for g in range(2))))
    assert dvl[f"bias/maxskew_dvl@{k}"] == pytest.approx(np.mean(skews)), k
    assert dvl[f"bias/ndkl@{k}"] == exact[f"bias/ndkl@{k}"]
  with pytest.raises(ValueError, match="convention='dvl'"):
    ev.build_evaluators({"s": {**base, "convention": "dvl"}}, context)
