"""Tests for the synthetic world: planted statistics, pixels, captions, seeds."""
import re

import numpy as np
import pytest
from scipy import stats

from siglip_fair.data import render
from siglip_fair.data import world

KEYS = ("id", "image", "captions", "kind", "gender", "s", "occupation", "y",
        "w", "object_label")


def _tol(p, n):
  """4 binomial standard errors: a deterministic seed passes or fails always."""
  return 4 * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def train():
  return world.generate_split(world.default_config(), "train")


def _exact_cfg(**sizes):
  """No pixel noise, no jitter: pixels are exact functions of the labels."""
  cfg = world.default_config()
  cfg.noise = 0.0
  cfg.jitter = 0.0
  for split, n in sizes.items():
    cfg.sizes[split] = n
  return cfg


def _f(img):
  return img.astype(np.float64) / 255.0


def _background(img):
  """Background colour per image from the left edge (never drawn over)."""
  s = img.shape[1]
  return _f(img[:, s // 2, 0])


def test_planted_rates(train):
  cfg = world.default_config()
  kind, gender, occ = train["kind"], train["gender"], train["occupation"]
  w = train["w"]
  person = kind == 1
  n = person.sum()
  assert abs(person.mean() - cfg.person_share) < _tol(cfg.person_share, kind.size)
  woman = gender == 1
  assert abs(woman[person].mean() - cfg.woman_prevalence) < _tol(0.3, n)
  # Person, occupation and gender draws are stratified per chunk, so the planted rates hold to
  # rounding, well inside the acceptance band of +-0.03 (e.g. P(woman | nurse)).
  nurse = occ == world.OCCUPATIONS.index("nurse")
  assert abs(woman[nurse].mean() - 0.5) < 0.03
  np.testing.assert_allclose(world.woman_probability(cfg), [0.5, 0.1] * 5)
  for o in range(len(world.OCCUPATIONS)):
    planted = cfg.woman_prevalence + (0.2 if o % 2 == 0 else -0.2)
    sel = occ == o
    assert abs(woman[sel].mean() - planted) < 0.01
    assert abs(sel.sum() / n - 0.1) < _tol(0.1, n)  # occupations uniform
    own = w[sel, o].mean()
    assert abs(own - cfg.proxy_strength) < _tol(0.8, sel.sum())
    other = w[person & ~sel, o].mean()
    assert abs(other - cfg.proxy_base_rate) < _tol(0.05, (person & ~sel).sum())
  obj_rate = w[~person].mean()
  assert abs(obj_rate - cfg.object_proxy_rate) < _tol(0.05, w[~person].size)


def test_fields_are_consistent(train):
  assert set(train) == set(KEYS)
  n = train["id"].size
  np.testing.assert_array_equal(train["id"], np.arange(n))
  person = train["kind"] == 1
  m, c = len(world.GROUPS), len(world.OCCUPATIONS)
  np.testing.assert_array_equal(train["s"][person],
                                np.eye(m)[train["gender"][person]])
  np.testing.assert_array_equal(train["y"][person],
                                np.eye(c)[train["occupation"][person]])
  assert not train["s"][~person].any() and not train["y"][~person].any()
  assert np.all(train["gender"][~person] == -1)
  assert np.all(train["occupation"][~person] == -1)
  assert np.all(train["object_label"][person] == -1)
  assert np.all(train["object_label"][~person] >= 0)
  assert train["image"].dtype == np.uint8
  assert train["image"].shape[1:] == (32, 32, 3)
  assert train["captions"].shape == (n, 3)
  assert isinstance(train["captions"][0, 0], bytes)


def test_eval_splits():
  cfg = world.default_config()
  people = world.generate_split(cfg, "people")
  assert np.all(people["kind"] == 1) and not people["w"].any()
  np.testing.assert_array_equal(people["gender"], np.arange(1000) % 2)
  assert set(people["occupation"]) == set(range(len(world.OCCUPATIONS)))
  objects = world.generate_split(cfg, "objects")
  assert np.all(objects["kind"] == 0) and np.all(objects["gender"] == -1)
  np.testing.assert_array_equal(np.bincount(objects["object_label"]), [100] * 10)


def test_iter_examples_match_generate_split():
  cfg = world.default_config()
  cfg.sizes.people = 30
  arrays = world.generate_split(cfg, "people")
  examples = list(world.iter_examples(cfg, "people"))
  assert len(examples) == 30
  for i, ex in enumerate(examples):
    assert set(ex) == set(KEYS)
    for key in KEYS:
      np.testing.assert_array_equal(ex[key], arrays[key][i])
      assert np.asarray(ex[key]).dtype == arrays[key].dtype


def test_same_seed_same_world_other_seed_other_world():
  cfg = world.default_config()
  cfg.sizes.retrieval = 300
  a = world.generate_split(cfg, "retrieval")
  b = world.generate_split(cfg, "retrieval")
  for key in KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  cfg.seed = 1
  c = world.generate_split(cfg, "retrieval")
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["kind"], c["kind"])
  assert not np.array_equal(a["captions"], c["captions"])


def test_train_and_retrieval_are_different_streams():
  cfg = world.default_config()
  cfg.sizes.train = cfg.sizes.retrieval = 200
  a = world.generate_split(cfg, "train")
  b = world.generate_split(cfg, "retrieval")
  assert not np.array_equal(a["kind"], b["kind"])


def test_chunking_does_not_change_examples():
  cfg = world.default_config()
  cfg.sizes.train = 2500
  full = world.generate_split(cfg, "train")
  window = world.generate_split(cfg, "train", 700, 2100)
  cfg.sizes.train = 1200
  short = world.generate_split(cfg, "train")
  for key in KEYS:
    np.testing.assert_array_equal(window[key], full[key][700:2100])
    np.testing.assert_array_equal(short[key], full[key][:1200])
  empty = world.generate_split(cfg, "train", 5, 5)
  assert empty["image"].shape == (0, 32, 32, 3)
  assert empty["captions"].shape == (0, 3)


def _tint(bg):
  """Least-squares inverse of the tint colour map."""
  d = render.WARM.astype(np.float64) - render.COOL
  return (bg - render.COOL) @ d / (d @ d)


def test_tint_encodes_gender_and_is_uniform_on_objects():
  cfg = _exact_cfg(train=4000)
  a = world.generate_split(cfg, "train")
  g = _tint(_background(a["image"]))
  person = a["kind"] == 1
  for group, mean in enumerate(world.TINT_MEANS):
    sel = person & (a["gender"] == group)
    # Clipping N(mean, 0.1) to [0, 1] moves the mean by < 1e-3.
    assert abs(g[sel].mean() - mean) < 4 * 0.1 / np.sqrt(sel.sum()) + 0.005
    assert abs(g[sel].std() - cfg.tint_std) < 0.01
  assert stats.kstest(np.clip(g[~person], 0, 1), "uniform").pvalue > 1e-3


def test_occupation_cues_drawn_in_train_not_in_people():
  cfg = _exact_cfg(train=600, people=200)
  s = cfg.image_size
  body = (int(0.57 * s), s // 2)  # inside every body when jitter is 0
  tool = (slice(int(0.48 * s), int(0.63 * s)),  # tool box, right of body
          slice(int(0.63 * s), int(0.78 * s)))
  for split in ("train", "people"):
    a = world.generate_split(cfg, split)
    person = a["kind"] == 1
    img = _f(a["image"][person])
    want = (render.UNIFORM_COLOURS[a["occupation"][person]] if split == "train"
            else np.broadcast_to(render.NEUTRAL_BODY, (person.sum(), 3)))
    np.testing.assert_allclose(img[:, body[0], body[1]], want, atol=1 / 255)
    bg = _background(a["image"][person])[:, None, None]
    tool_dev = np.abs(img[:, tool[0], tool[1]] - bg).max((1, 2, 3))
    if split == "train":
      assert np.all(tool_dev > 0.05)
    else:
      assert np.all(tool_dev < 1e-6)


def test_proxy_icons_drawn_iff_w():
  cfg = _exact_cfg(train=800)
  a = world.generate_split(cfg, "train")
  s = cfg.image_size
  bg = _background(a["image"])
  for j, (cx, cy) in enumerate(render.PROXY_SLOTS):
    box = (slice(max(0, round((cy - 0.08) * s)), round((cy + 0.08) * s)),
           slice(max(0, round((cx - 0.08) * s)), round((cx + 0.08) * s)))
    drawn = np.abs(_f(a["image"][:, box[0], box[1]]) -
                   bg[:, None, None]).max((1, 2, 3)) > 2 / 255
    np.testing.assert_array_equal(drawn, a["w"][:, j] == 1)


def test_object_scenes_show_their_class_colour():
  cfg = _exact_cfg(objects=200)
  a = world.generate_split(cfg, "objects")
  s = cfg.image_size
  centre = _f(a["image"][:, int(0.18 * s):int(0.82 * s)])
  colours = render.OBJECT_COLOURS[None, :, None, None]
  dist = np.abs(centre[:, None] - colours).max(-1)
  counts = (dist < 1.5 / 255).sum((2, 3))  # [n, classes]
  np.testing.assert_array_equal(counts.argmax(1), a["object_label"])


def test_noise_knob_is_pixel_std():
  cfg = _exact_cfg(objects=100)
  clean = _f(world.generate_split(cfg, "objects")["image"])
  cfg.noise = 0.05
  noisy = _f(world.generate_split(cfg, "objects")["image"])
  inside = (clean > 0.2) & (clean < 0.8)  # away from clipping at 0 and 1
  diff = (noisy - clean)[inside]
  assert abs(diff.mean()) < 0.002 and abs(diff.std() - 0.05) < 0.003


def _group_words():
  """The word that tells each group's caption nouns apart ("male person")."""
  return [{n.split()[0] for n in g} for g in world.GROUP_NOUNS]


def _words(caption):
  return re.findall(r"[a-z]+", caption.decode())


def test_captions_follow_the_labels(train):
  cfg = world.default_config()
  nouns = _group_words()
  person = train["kind"] == 1
  named = wrong = total = occ_named = 0
  for i in np.flatnonzero(person)[:3000]:
    g, o = train["gender"][i], world.OCCUPATIONS[train["occupation"][i]]
    for cap in train["captions"][i]:
      words = set(_words(cap))
      total += 1
      said = [k for k in range(2) if words & nouns[k]]
      assert len(said) <= 1
      named += bool(said)
      wrong += bool(said) and said[0] != g
      assert not words & (set(world.OCCUPATIONS) - {o})  # only the true one
      occ_named += o in words
      mentioned = {p for p in world.PROXIES if p in words}
      drawn = {world.PROXIES[j] for j in np.flatnonzero(train["w"][i])}
      assert mentioned <= drawn
  assert abs(named / total - cfg.caption_gender_rate) < _tol(0.8, total)
  assert abs(wrong / named - cfg.caption_gender_noise) < _tol(0.03, named)
  assert abs(occ_named / total - cfg.caption_occupation_rate) < _tol(0.8, total)
  for i in np.flatnonzero(~person)[:500]:
    for cap in train["captions"][i]:
      words = set(_words(cap))
      assert world.OBJECT_CLASSES[train["object_label"][i]] in words
      assert not words & (nouns[0] | nouns[1] | set(world.OCCUPATIONS))


def test_people_captions_name_only_the_true_group():
  cfg = world.default_config()
  cfg.sizes.people = 200
  a = world.generate_split(cfg, "people")
  nouns = _group_words()
  for i in range(200):
    g = a["gender"][i]
    for cap in a["captions"][i]:
      words = set(_words(cap))
      assert words & nouns[g] and not words & nouns[1 - g], cap
      assert not words & set(world.OCCUPATIONS + world.PROXIES)


@pytest.mark.parametrize("knob,value,match", [
    ("association", 0.8, "association"),
    ("woman_prevalence", 1.2, "woman_prevalence"),
    ("person_share", -0.1, "person_share"), ("image_size", 8, "image_size"),
    ("noise", -1.0, "noise")])
def test_bad_knobs_raise(knob, value, match):
  cfg = world.default_config()
  cfg[knob] = value
  with pytest.raises(ValueError, match=match):
    world.generate_split(cfg, "people", 0, 1)


def test_bad_split_and_range_raise():
  cfg = world.default_config()
  with pytest.raises(ValueError, match="split"):
    world.generate_split(cfg, "validation")
  with pytest.raises(ValueError, match="stop"):
    world.generate_split(cfg, "people", 0, 5000)
