"""Tests for the world's issue-17 knobs: legacy golden, composed object scenes, owner skew."""
import hashlib
import itertools
import re

import numpy as np
import pytest
from scipy import stats
from sklearn.neighbors import NearestCentroid

from siglip_fair.data import render
from siglip_fair.data import scenes
from siglip_fair.data import world

KEYS = ("id", "image", "captions", "kind", "gender", "s", "occupation", "y",
        "w", "object_label")
NEW_KNOBS = ("object_scenes", "object_class_mode", "object_shapes", "object_colours",
             "object_patterns", "objects_per_scene_max", "object_scale", "captions",
             "caption_attribute_rate", "owner_attribute_skew", "owner_woman_prevalence",
             "owner_captions")


def _digest(a):
  h = hashlib.sha256()
  for key in KEYS:
    if key == "captions":
      h.update(b"\x00".join(a[key].reshape(-1).tolist()))
    else:
      h.update(np.ascontiguousarray(a[key]).tobytes())
  return h.hexdigest()[:16]


# sha256 prefixes of every field of these rows, computed with the code before the knobs existed.
_GOLDEN = [("train", 0, 60, "313450add5ae526e"), ("train", 990, 1030, "fbb05a274077b201"),
           ("objects", 0, 30, "a78cc306d4a609a6"), ("people", 0, 30, "a23b2bdae54969ea"),
           ("retrieval", 0, 60, "1a2e89ec3f22e4d7")]


def test_default_world_is_bit_identical_to_the_legacy_world():
  cfg = world.default_config()
  assert cfg.object_scenes == "legacy" and cfg.captions == "legacy"
  assert cfg.owner_attribute_skew == 0.0 and cfg.objects_per_scene_max == 1
  for split, lo, hi, golden in _GOLDEN:
    assert _digest(world.generate_split(cfg, split, lo, hi)) == golden, (split, lo, hi)
  cfg.object_background, cfg.seed = "tint", 3
  assert _digest(world.generate_split(cfg, "train", 0, 60)) == "f9f2a32f5b6964e1"
  assert world.generate_split(world.default_config(), "train", 4, 5)["captions"][0].tolist() == [
      b"a close-up of a purple house", b"a picture of a house", b"a photo of a purple house"]
  assert world.object_class_names(world.default_config()) == world.OBJECT_CLASSES


def test_configs_without_the_new_knobs_build_the_legacy_world():
  """A run's config.json written before the knobs reads them at their defaults."""
  cfg = world.default_config()
  old = world.default_config()
  for knob in NEW_KNOBS:
    del old[knob]
  world.validate_config(old)
  assert world.object_class_names(old) == world.OBJECT_CLASSES
  for key in KEYS:
    np.testing.assert_array_equal(world.generate_split(old, "retrieval", 0, 50)[key],
                                  world.generate_split(cfg, "retrieval", 0, 50)[key])


def _composed(**knobs):
  cfg = world.default_config()
  cfg.object_scenes = "composed"
  cfg.object_background = "varied"
  for knob, value in knobs.items():
    cfg[knob] = value
  return cfg


@pytest.mark.parametrize("mode,count", [("shape", 8), ("shape_colour", 48),
                                        ("shape_colour_pattern", 144)])
def test_class_names(mode, count):
  cfg = _composed(object_class_mode=mode)
  names = world.object_class_names(cfg)
  assert len(names) == count == len(set(names))
  assert world.describe(cfg)["num_object_classes"] == count
  cfg.object_shapes, cfg.object_colours = 10, 10  # the counts are knobs
  assert len(world.object_class_names(cfg)) == dict(shape=10, shape_colour=100,
                                                    shape_colour_pattern=300)[mode]


def test_objects_split_is_balanced_and_names_match_what_is_drawn():
  cfg = _composed(object_class_mode="shape_colour_pattern", objects_per_scene_max=3)
  cfg.sizes.objects = 288
  a = world.generate_split(cfg, "objects")
  np.testing.assert_array_equal(np.bincount(a["object_label"]), [2] * 144)
  attrs = world.scene_attributes(cfg, "objects")
  names = world.object_class_names(cfg)
  for i, label in enumerate(a["object_label"]):
    assert names[label] == " ".join([scenes.PATTERNS[attrs["pattern"][i]],
                                     scenes.COLOUR_NAMES[attrs["colour"][i]],
                                     scenes.SHAPES[attrs["shape"][i]]])
  assert set(attrs["count"]) == {1, 2, 3}


def test_train_classes_uniform_and_within_class_variation_independent():
  cfg = _composed(objects_per_scene_max=3)
  cfg.sizes.train = 8000
  a = world.generate_split(cfg, "train")
  attrs = world.scene_attributes(cfg, "train")
  scene = a["kind"] == 0
  labels = a["object_label"][scene]
  counts = np.bincount(labels, minlength=48)
  assert stats.chisquare(counts).pvalue > 1e-3
  # Pattern, size, count and background vary within every class, independently of it.
  for key, expected in (("pattern", {0, 1, 2}), ("size", {0, 1}), ("count", {1, 2, 3}),
                        ("background", set(range(6)))):
    values = attrs[key][scene]
    assert set(values) == expected, key
    table = np.array([[np.sum((labels == c) & (values == v)) for v in np.unique(values)]
                      for c in range(48)])
    assert stats.chi2_contingency(table).pvalue > 1e-3, key
  # Copies take distinct columns.
  cols = attrs["column"][scene]
  for n in (2, 3):
    sel = attrs["count"][scene] == n
    assert np.all([len(set(c[:n])) == n for c in cols[sel]])


def test_composed_scenes_draw_each_copy_at_its_cell():
  # Solid shapes whose centre is filled (not the ring or the crescent).
  cfg = _composed(objects_per_scene_max=3, noise=0.0, jitter=0.0, object_patterns=1,
                  object_shapes=6)
  cfg.sizes.objects = 300
  a = world.generate_split(cfg, "objects")
  attrs = world.scene_attributes(cfg, "objects")
  s = cfg.image_size
  img = a["image"].astype(np.float64) / 255
  for i in range(300):
    colour = scenes.COLOURS[attrs["colour"][i]]
    for col, row in itertools.product(range(3), range(3)):
      px = img[i, int(scenes.ROWS[row] * s), int(scenes.COLUMNS[col] * s)]
      occupied = any((c, r) == (col, row) for c, r in zip(attrs["column"][i], attrs["row"][i]))
      if occupied:
        np.testing.assert_allclose(px, colour, atol=1.5 / 255)
      else:  # the background there (no proxy reaches a cell centre)
        assert np.abs(px - colour).max() > 0.1


def test_object_scale_scales_the_drawn_area():
  def area(scale):
    cfg = _composed(noise=0.0, jitter=0.0, object_scale=scale, object_background="grey",
                    object_proxy_rate=0.0)
    cfg.sizes.objects = 480
    img = world.generate_split(cfg, "objects")["image"].astype(np.float64) / 255
    return np.sum(np.abs(img - render.NEUTRAL_BACKGROUND).max(-1) > 2 / 255)
  # Areas grow with the square of the radius (up to pixel rounding and the image border).
  assert 1.55 < area(1.3) / area(1.0) < 1.8  # 1.3 ** 2 = 1.69 but for pixels and border
  assert 0.55 < area(0.8) / area(1.0) < 0.72  # 0.8 ** 2 = 0.64


def test_varied_backgrounds_stay_off_the_tint_axis():
  assert np.all(scenes.BACKGROUND_COLOURS[..., 0] == scenes.BACKGROUND_COLOURS[..., 2])
  cfg = _composed(noise=0.0, jitter=0.0)
  cfg.sizes.train = 2000
  a = world.generate_split(cfg, "train")
  attrs = world.scene_attributes(cfg, "train")
  scene = a["kind"] == 0
  edge = a["image"][scene, :, 0].astype(np.float64) / 255  # never drawn over, jitter 0
  np.testing.assert_allclose(edge[..., 0], edge[..., 2], atol=1 / 255)
  bg = attrs["background"][scene]
  np.testing.assert_allclose(edge[:, 0], scenes.BACKGROUND_COLOURS[bg, 0], atol=0.03)
  np.testing.assert_allclose(edge[:, -1], scenes.BACKGROUND_COLOURS[bg, 1], atol=0.03)
  assert len(np.unique(bg)) == len(scenes.BACKGROUND_NAMES)
  # Owners' groups never show: the background distribution is the same for both.
  owned = a["gender"][scene]
  table = [np.bincount(bg[owned == g], minlength=6) for g in (0, 1)]
  assert stats.chi2_contingency(table).pvalue > 1e-3


def test_object_scenes_knob_changes_only_object_scenes():
  cfg = world.default_config()
  cfg.sizes.retrieval = 1200
  a = world.generate_split(cfg, "retrieval")
  cfg = _composed(captions="legacy")
  cfg.sizes.retrieval = 1200
  b = world.generate_split(cfg, "retrieval")
  person = a["kind"] == 1
  np.testing.assert_array_equal(a["kind"], b["kind"])
  for key in ("image", "captions", "gender", "occupation", "w"):
    np.testing.assert_array_equal(a[key][person], b[key][person], err_msg=key)
  assert not np.array_equal(a["image"][~person], b["image"][~person])


def test_every_class_renders_distinguishably():
  """Noise-free prototypes: any two shapes differ in >= 8 pixels at 32 x 32 at either size,
  colours differ from each other and from every background, patterns from their colour."""
  size = 32
  dx, dy = render._offsets(size, np.array([0.5]), np.array([0.5]))  # pylint: disable=protected-access
  for radius in scenes.SIZE_RADII:
    masks = [scenes.shape_mask(k, dx, dy, np.full((1, 1, 1), radius))[0]
             for k in range(len(scenes.SHAPES))]
    assert min(m.sum() for m in masks) >= 14
    for i, j in itertools.combinations(range(len(masks)), 2):
      assert (masks[i] ^ masks[j]).sum() >= 8, (radius, scenes.SHAPES[i], scenes.SHAPES[j])
  c = scenes.COLOURS
  for i, j in itertools.combinations(range(len(c)), 2):
    assert np.abs(c[i] - c[j]).max() >= 0.3
  assert np.abs(c[:, None] - scenes.BACKGROUND_COLOURS.reshape(1, -1, 3)).max(-1).min() >= 0.2
  assert np.abs(c - scenes.PATTERN_COLOURS).max(-1).min() >= 0.35


def _fft_features(images, f=10):
  """Low-frequency amplitude spectrum: blind to where the objects are, not to what they are."""
  x = images.astype(np.float32) / 255
  m = np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True), axes=(1, 2)))
  return np.log1p(np.concatenate([m[:, :f, :f], m[:, -f:, :f]], 1)).reshape(len(x), -1)


@pytest.mark.parametrize("mode,min_acc", [("shape_colour", 0.3), ("shape", 0.4)])
def test_classes_are_learnable_from_20_images_each(mode, min_acc):
  """A nearest-centroid classifier on 20 images per class beats chance many times over, so
  the classes are learnable at 32 x 32 despite sizes, positions, counts and backgrounds."""
  cfg = _composed(object_class_mode=mode, objects_per_scene_max=2)
  k = len(world.object_class_names(cfg))
  cfg.sizes.objects = 40 * k
  a = world.generate_split(cfg, "objects")
  x, y = _fft_features(a["image"]), a["object_label"]
  clf = NearestCentroid().fit(x[:20 * k], y[:20 * k])
  pred = clf.predict(x[20 * k:])
  acc = np.mean(pred == y[20 * k:])
  assert acc >= min_acc and acc >= 3 / k, acc
  assert acc < 0.95  # and not trivially so
  # Every class is recognised above chance.
  per_class = np.array([np.mean(pred[y[20 * k:] == c] == c) for c in range(k)])
  assert per_class.min() > 1 / k, per_class


def test_composed_world_is_deterministic_and_independent_of_chunking():
  cfg = _composed(objects_per_scene_max=3, captions="descriptive", owner_attribute_skew=0.2,
                  owner_woman_prevalence=0.25, owner_captions="with")
  cfg.sizes.train = 2500
  full = world.generate_split(cfg, "train")
  again = world.generate_split(cfg, "train")
  window = world.generate_split(cfg, "train", 700, 2100)
  cfg.sizes.train = 1200
  short = world.generate_split(cfg, "train")
  for key in KEYS:
    np.testing.assert_array_equal(again[key], full[key])
    np.testing.assert_array_equal(window[key], full[key][700:2100])
    np.testing.assert_array_equal(short[key], full[key][:1200])
  attrs = world.scene_attributes(cfg, "train", 700, 1200)
  np.testing.assert_array_equal(attrs["shape"], world.scene_attributes(cfg, "train")["shape"][700:])
  cfg.seed = 1
  other = world.generate_split(cfg, "train")
  for key in ("image", "captions", "object_label"):
    assert not np.array_equal(other[key], short[key]), key


@pytest.mark.parametrize("knobs,match", [
    (dict(object_scenes="fancy"), "object_scenes"), (dict(captions="long"), "captions"),
    (dict(object_class_mode="colour"), "object_class_mode"),
    (dict(object_shapes=0), "object_shapes"), (dict(object_shapes=11), "object_shapes"),
    (dict(object_shapes=True), "object_shapes"), (dict(object_colours=11), "object_colours"),
    (dict(object_patterns=4), "object_patterns"),
    (dict(objects_per_scene_max=4), "objects_per_scene_max"),
    (dict(object_scenes="legacy", objects_per_scene_max=2), "objects_per_scene_max"),
    (dict(object_class_mode="shape", object_shapes=1), "one object class"),
    (dict(caption_attribute_rate=1.5), "caption_attribute_rate"),
    (dict(owner_attribute_skew=0.35), "owner_attribute_skew"),
    (dict(owner_attribute_skew=-0.1), "owner_attribute_skew"),
    (dict(owner_woman_prevalence=0.2, owner_attribute_skew=0.25), "owner_attribute_skew"),
    (dict(owner_woman_prevalence=1.1), "owner_woman_prevalence"),
    (dict(owner_woman_prevalence=-0.1), "owner_woman_prevalence"),
    (dict(owner_captions="mine"), "owner_captions"),
    (dict(object_background="blue"), "object_background"),
    (dict(object_scale=0.3), "object_scale"), (dict(object_scale=2.0), "object_scale")])
def test_bad_new_knobs_raise(knobs, match):
  cfg = _composed()
  for knob, value in knobs.items():
    cfg[knob] = value
  with pytest.raises(ValueError, match=match):
    world.generate_split(cfg, "objects", 0, 1)


def _owned(cfg):
  a = world.generate_split(cfg, "train")
  owned = (a["kind"] == 0) & (a["gender"] >= 0)
  return a, owned


@pytest.mark.parametrize("scenes_mode", ["legacy", "composed"])
def test_owner_attribute_skew_spreads_classes_and_keeps_prevalence(scenes_mode):
  cfg = world.default_config() if scenes_mode == "legacy" else _composed()
  cfg.owner_attribute_skew = 0.25
  cfg.sizes.train = 20000  # ~3000 owned scenes
  planted = world.owner_woman_probability(cfg)
  k = len(world.object_class_names(cfg))
  np.testing.assert_allclose(planted.mean(), cfg.woman_prevalence)
  np.testing.assert_allclose([planted.min(), planted.max()], [0.05, 0.55])
  a, owned = _owned(cfg)
  woman = a["gender"][owned] == 1
  p = cfg.woman_prevalence
  assert abs(woman.mean() - p) < 4 * np.sqrt(p * (1 - p) / owned.sum())
  labels = a["object_label"][owned]
  n = np.bincount(labels, minlength=k)
  rate = np.bincount(labels, weights=woman, minlength=k) / n
  z = (rate - planted) / np.sqrt(planted * (1 - planted) / n)
  assert stats.chi2(k).sf(np.sum(z**2)) > 1e-3  # per-class rates follow the planted skew
  assert np.corrcoef(rate, planted)[0, 1] > 0.8
  # Without skew every class is owned alike.
  cfg.owner_attribute_skew = 0.0
  b, owned0 = _owned(cfg)
  table = [np.bincount(b["object_label"][owned0 & (b["gender"] == g)], minlength=k)
           for g in (0, 1)]
  assert stats.chi2_contingency(table).pvalue > 1e-3
  # The owner is latent: no pixel moves with the skew.
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(owned, owned0)


def test_owner_skew_is_a_fixed_documented_function_of_the_class():
  cfg = _composed(owner_attribute_skew=0.2)
  p = world.owner_woman_probability(cfg)
  assert len(p) == 48 and len(np.unique(np.round(p, 9))) == 48
  np.testing.assert_allclose(np.sort(p), 0.3 + 0.2 * np.linspace(-1, 1, 48))
  cfg.seed = 5  # not a function of the seed
  np.testing.assert_array_equal(world.owner_woman_probability(cfg), p)
  described = world.describe(cfg)["owner_woman_probability"]
  assert list(described.values()) == p.tolist()
  cfg.owner_attribute_skew = 0.0
  np.testing.assert_array_equal(world.owner_woman_probability(cfg), np.full(48, 0.3))


def test_owner_prevalence_is_planted_apart_from_the_people():
  """Owners follow owner_woman_prevalence, people woman_prevalence; no pixel moves."""
  cfg = _composed(captions="descriptive")
  cfg.sizes.train = 6000
  a, owned = _owned(cfg)
  cfg.owner_woman_prevalence = 0.1
  b, owned_b = _owned(cfg)
  person = b["kind"] == 1
  np.testing.assert_array_equal(owned, owned_b)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["gender"][person], b["gender"][person])
  # Stratified per chunk of ~150 owned scenes (6 chunks): the share holds to ~1 / 150.
  assert abs(a["gender"][owned].mean() - 0.3) < 0.01
  assert abs(b["gender"][owned_b].mean() - 0.1) < 0.01
  assert abs(b["gender"][person].mean() - cfg.woman_prevalence) < 0.01
  # The owners that were women and stay women are the same scenes: one uniform decides.
  assert np.all(b["gender"][owned] <= a["gender"][owned])
  # A config written before the knob reads the people's prevalence for the owners.
  old = _composed(captions="descriptive")
  old.woman_prevalence = 0.4
  del old["owner_woman_prevalence"]
  np.testing.assert_allclose(world.owner_woman_probability(old), 0.4)


def _group_nouns():
  return [{n.split()[0] for n in nouns} for nouns in world.GROUP_NOUNS]


def _caption_words(caption):
  return re.findall(r"[a-z]+", caption.decode())


def test_owner_captions_with_names_the_owner_as_the_subject():
  cfg = _composed(captions="descriptive", owner_captions="with")
  cfg.sizes.train = 1500
  a, owned = _owned(cfg)
  plain = _composed(captions="descriptive")
  plain.sizes.train = 1500
  b, _ = _owned(plain)
  nouns = _group_nouns()
  for i in np.flatnonzero(owned)[:200]:
    for cap, old in zip(a["captions"][i], b["captions"][i]):
      text = cap.decode()
      assert "'s " not in text and " owned by " not in text and " belongs to " not in text
      assert text.startswith(("a photo of a", "a picture of a", "a ", "an ")), text
      # The owner comes first, then what the scene shows, as the possessive caption says it.
      said = [w for w in _caption_words(cap) if w in nouns[0] | nouns[1] | {"person"}]
      assert said == [w for w in _caption_words(old) if w in nouns[0] | nouns[1] | {"person"}]
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["captions"][~owned], b["captions"][~owned])
  assert not np.array_equal(a["captions"][owned], b["captions"][owned])
