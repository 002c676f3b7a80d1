"""Tests for caption lexicons, combination rules, quality metrics and I/O."""
import os
import re

import numpy as np
import pytest

from siglip_fair import annotate
from siglip_fair.data import world

LEX = annotate.default_lexicon_config()


def _ann(s, known, y=None, w=None):
  s = np.asarray(s, np.float32)
  n = s.shape[0]
  y = np.zeros((n, 10)) if y is None else y
  w = np.zeros((n, 10)) if w is None else w
  return dict(s=s, known=np.asarray(known, np.float32),
              y=np.asarray(y, np.float32), w=np.asarray(w, np.float32))


def test_lexicon_on_handmade_captions():
  captions = [
      "A photo of a woman who works as a nurse with a thermometer",
      b"a male person, a Doctor",
      "a person working as a housekeeper next to a house",
      "a female scientist",  # 'female' must not match 'male'
      "the man and the lady with two laptops and a book",
      "a photo of a red ball",
      "a photo of a man's car",  # possessive 's, straight and typographic
      "a lady\u2019s cup owned by the guys'  club",
  ]
  ann = annotate.annotate_captions(captions, LEX)
  o, p = world.OCCUPATIONS.index, world.PROXIES.index
  want_s = [[0, 1], [1, 0], [0, 0], [0, 1], [1, 1], [0, 0], [1, 0], [1, 1]]
  want_y = {0: [o("nurse")], 1: [o("doctor")], 2: [o("housekeeper")],
            3: [o("scientist")]}
  want_w = {0: [p("thermometer")], 4: [p("laptop"), p("book")]}
  np.testing.assert_array_equal(ann["s"], want_s)
  np.testing.assert_array_equal(ann["known"], [1, 1, 0, 1, 1, 0, 1, 1])
  for field, want in (("y", want_y), ("w", want_w)):
    expected = np.zeros((8, 10), np.float32)
    for row, cols in want.items():
      expected[row, cols] = 1
    np.testing.assert_array_equal(ann[field], expected)
  for v in ann.values():
    assert v.dtype == np.float32


def test_tokenize_drops_possessives():
  assert annotate.tokenize("A Man's car") == ("a", "man", "car")
  assert annotate.tokenize(b"the women\xe2\x80\x99s room") == (
      "the", "women", "room")
  assert annotate.tokenize("the ladies' hats") == ("the", "ladies", "hats")
  assert annotate.tokenize("a sofa's arm, a mans") == (
      "a", "sofa", "arm", "a", "mans")


def test_lexicon_is_configurable_and_matches_phrases():
  lex = annotate.default_lexicon_config()
  lex.s.words.woman = ("woman", "young lady")
  ann = annotate.annotate_captions(
      ["a lady", "a young lady", "lady young"], lex)
  np.testing.assert_array_equal(ann["s"][:, 1], [0, 1, 0])
  lex.s.words.woman = ()
  with pytest.raises(ValueError, match="woman"):
    annotate.annotate_captions(["a lady"], lex)


def test_precision_recall_by_hand():
  # Rows: truth man, truth woman, truth woman, unknown, truth man.
  truth = _ann([[1, 0], [0, 1], [0, 1], [0, 0], [1, 0]], [1, 1, 1, 0, 1])
  # Predicted: man (TP), man (FP man, FN woman), unknown-but-s-set (ignored:
  # FN woman), man (FP man), woman (FP woman, FN man).
  pred = _ann([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1]], [1, 1, 0, 1, 1])
  truth["y"][[0, 1], 3] = 1
  pred["y"][[0, 2], 3] = 1
  pr = annotate.precision_recall(pred, truth)
  assert pr["s/man/precision"] == pytest.approx(1 / 3)
  assert pr["s/man/recall"] == pytest.approx(1 / 2)
  assert pr["s/woman/precision"] == pytest.approx(0 / 1)
  assert pr["s/woman/recall"] == pytest.approx(0 / 2)
  assert pr["s/micro/precision"] == pytest.approx(1 / 4)
  assert pr["s/micro/recall"] == pytest.approx(1 / 4)
  assert pr["known/precision"] == pytest.approx(3 / 4)
  assert pr["known/recall"] == pytest.approx(3 / 4)
  assert pr["y/doctor/precision"] == pytest.approx(1 / 2)
  assert pr["y/doctor/recall"] == pytest.approx(1 / 2)
  assert np.isnan(pr["y/nurse/precision"]) and np.isnan(pr["w/book/recall"])


def test_combine_rules_by_hand():
  # Rows: both agree, disagree, text only, image only, neither.
  text = _ann([[1, 0], [1, 0], [0, 1], [0, 0], [0, 0]], [1, 1, 1, 0, 0])
  image = _ann([[1, 0], [0, 1], [0, 0], [1, 0], [0, 0]], [1, 1, 0, 1, 0])
  text["y"][[0, 2], 0] = 1
  image["y"][[0, 3], 1] = 1
  want = {
      "either": ([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0]], [1, 1, 1, 1, 0]),
      "both": ([[1, 0], [0, 0], [0, 0], [0, 0], [0, 0]], [1, 0, 0, 0, 0]),
      "text_first": ([[1, 0], [1, 0], [0, 1], [1, 0], [0, 0]], [1, 1, 1, 1, 0]),
      "text": (text["s"], text["known"]),
      "image": (image["s"], image["known"]),
  }
  want_y01 = {"either": [[1, 1], [0, 0], [1, 0], [0, 1], [0, 0]],
              "both": [[0, 0]] * 5,
              "text_first": [[1, 0], [0, 0], [1, 0], [0, 1], [0, 0]]}
  for rule, (s, known) in want.items():
    out = annotate.combine(text, image, rule)
    np.testing.assert_array_equal(out["s"], s, err_msg=rule)
    np.testing.assert_array_equal(out["known"], known, err_msg=rule)
    if rule in want_y01:
      np.testing.assert_array_equal(out["y"][:, :2], want_y01[rule], err_msg=rule)
  with pytest.raises(ValueError, match="rule"):
    annotate.combine(text, image, "majority")


@pytest.fixture(scope="module")
def split():
  cfg = world.default_config()
  cfg.sizes.train = 4000
  return world.generate_split(cfg, "train")


def test_text_annotations_of_the_world_match_a_brute_force_count(split):
  cfg = annotate.default_config()
  pred = annotate.annotate_split(split, cfg)
  truth = annotate.from_ground_truth(split)
  pr = annotate.precision_recall(pred, truth)
  group_words = [set(LEX.s.words[g]) for g in world.GROUPS]
  counts = {g: dict(tp=0, pred=0, true=0) for g in world.GROUPS}
  occ = dict(tp=0, pred=0, true=0)
  for i, caption in enumerate(split["captions"][:, 0]):
    words = re.findall(r"[a-z]+", caption.decode())  # "man's" -> man, s
    for k, g in enumerate(world.GROUPS):
      said = bool(group_words[k] & set(words))
      true = split["gender"][i] == k  # people and owners of object scenes
      counts[g]["pred"] += said
      counts[g]["true"] += true
      counts[g]["tp"] += said and true
    for o, name in enumerate(world.OCCUPATIONS):
      said, true = name in words, split["occupation"][i] == o
      occ["pred"] += said
      occ["true"] += true
      occ["tp"] += said and true
  for g, c in counts.items():
    assert pr[f"s/{g}/precision"] == pytest.approx(c["tp"] / c["pred"])
    assert pr[f"s/{g}/recall"] == pytest.approx(c["tp"] / c["true"])
  assert pr["y/micro/precision"] == pytest.approx(occ["tp"] / occ["pred"])
  assert pr["y/micro/recall"] == pytest.approx(occ["tp"] / occ["true"])
  # Closed forms: a caption of an example with a group names one with probability
  # caption_gender_rate, the wrong one with caption_gender_noise; no other caption names one.
  wcfg = world.default_config()
  rate, noise = wcfg.caption_gender_rate, wcfg.caption_gender_noise
  n_true = sum(c["true"] for c in counts.values())
  assert n_true > 0.6 * split["id"].size  # people and owned object scenes
  assert pr["known/precision"] == 1.0
  assert abs(pr["known/recall"] - rate) < _tol(rate, n_true)
  n_said = rate * n_true
  assert abs(pr["s/micro/precision"] - (1 - noise)) < _tol(noise, n_said)
  assert abs(pr["s/micro/recall"] - rate * (1 - noise)) < _tol(
      rate * (1 - noise), n_true)
  assert pr["y/micro/precision"] == 1.0
  rate = wcfg.caption_occupation_rate
  assert abs(pr["y/micro/recall"] - rate) < _tol(rate, occ["true"])


def _tol(p, n):
  """4 binomial standard errors of a rate p over n draws."""
  return 4 * np.sqrt(p * (1 - p) / n)


def test_annotate_split_sources(split):
  cfg = annotate.default_config()
  n = split["id"].size
  for source in annotate.SOURCES:
    cfg.source = source
    ann = annotate.annotate_split(split, cfg)
    assert set(ann) == set(annotate.KEYS)
    assert ann["s"].shape == (n, 2) and ann["y"].shape == (n, 10)
    assert ann["w"].shape == (n, 10) and ann["known"].shape == (n,)
    np.testing.assert_array_equal(ann["u"], np.zeros(n))
  truth = annotate.annotate_split(split, _with(cfg, source="ground_truth"))
  # Known wherever the world sets a group: people and owned object scenes.
  np.testing.assert_array_equal(truth["known"], split["gender"] >= 0)
  assert truth["known"][split["kind"] == 0].any()
  np.testing.assert_array_equal(truth["s"], split["s"])
  text = annotate.annotate_split(split, _with(cfg, source="text"))
  combined = annotate.annotate_split(
      split, _with(cfg, source="combined", rule="both"))
  want = annotate.combine(text, truth, "both")
  for key in ("s", "known", "y", "w"):
    np.testing.assert_array_equal(combined[key], want[key])
  with pytest.raises(ValueError, match="source"):
    annotate.annotate_split(split, _with(cfg, source="clip"))


def _with(cfg, **changes):
  out = cfg.copy_and_resolve_references()
  out.update(changes)
  return out


def test_save_load_round_trip(tmp_path, split):
  ann = annotate.annotate_split(split, annotate.default_config())
  path = tmp_path / "sub" / "ann.npz"
  annotate.save_annotations(path, ann)
  assert os.listdir(path.parent) == ["ann.npz"]  # no temp file left behind
  back = annotate.load_annotations(path)
  assert set(back) == set(annotate.KEYS)
  for key in annotate.KEYS:
    assert back[key].dtype == np.float32
    np.testing.assert_array_equal(back[key], ann[key])


@pytest.mark.parametrize("corrupt,match", [
    (lambda a: a.update(s=np.full_like(a["s"], np.nan)), "'s'.*NaN"),
    (lambda a: a.update(y=a["y"][:-1]), "'y'.*shape"),
    (lambda a: a.pop("u"), "lack"),
    (lambda a: a.update(known=a["known"] * 2), "'known'.*outside"),
])
def test_load_rejects_bad_files(tmp_path, corrupt, match):
  ann = _ann([[1, 0], [0, 1]], [1, 1])
  ann["u"] = np.zeros(2, np.float32)
  corrupt(ann)
  path = tmp_path / "bad.npz"
  np.savez(path, **ann)
  with pytest.raises(ValueError, match=match):
    annotate.load_annotations(path)
  with pytest.raises(ValueError, match=match):
    annotate.save_annotations(tmp_path / "other.npz", ann)


def test_load_refuses_pickled_objects(tmp_path):
  path = tmp_path / "obj.npz"
  np.savez(path, s=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError):
    annotate.load_annotations(path)
