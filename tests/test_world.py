"""Tests for the synthetic world: planted statistics, pixels, captions, seeds."""
import itertools
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
  group = train["gender"] >= 0  # people and owned object scenes
  assert group[person].all() and group[~person].any()
  m, c = len(world.GROUPS), len(world.OCCUPATIONS)
  np.testing.assert_array_equal(train["s"][group],
                                np.eye(m)[train["gender"][group]])
  np.testing.assert_array_equal(train["y"][person],
                                np.eye(c)[train["occupation"][person]])
  assert not train["s"][~group].any() and not train["y"][~person].any()
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
  assert np.all(people["kind"] == 1)
  # Proxies at random, independent of group and occupation.
  assert abs(people["w"].mean() - cfg.people_proxy_rate) < _tol(cfg.people_proxy_rate, people["w"].size)
  for g in range(2):
    rate = people["w"][people["gender"] == g].mean()
    assert abs(rate - cfg.people_proxy_rate) < _tol(cfg.people_proxy_rate, people["w"].size / 2)
  np.testing.assert_array_equal(people["gender"], np.arange(1000) % 2)
  assert set(people["occupation"]) == set(range(len(world.OCCUPATIONS)))
  objects = world.generate_split(cfg, "objects")
  # No owners: the RB set's images and captions carry no group at all.
  assert np.all(objects["kind"] == 0) and np.all(objects["gender"] == -1)
  assert not objects["s"].any()
  nouns = _group_words()
  for cap in objects["captions"].reshape(-1):
    assert not set(_words(cap)) & (nouns[0] | nouns[1] | {"person"}), cap
  np.testing.assert_array_equal(np.bincount(objects["object_label"]), [100] * 10)


def test_owner_rates_are_planted(train):
  cfg = world.default_config()
  scene = train["kind"] == 0
  owned = scene & (train["gender"] >= 0)
  # Stratified per chunk: owner and woman-owner counts are each off by <= 1 per chunk of ~500
  # object scenes (20 chunks), so the shares hold to 20 / 10000 and ~20 / 3000.
  assert abs(owned.sum() / scene.sum() - cfg.object_owner_rate) < 0.0025
  assert abs(train["gender"][owned].mean() - cfg.woman_prevalence) < 0.01
  assert np.all(train["object_label"][owned] >= 0)
  assert np.all(train["occupation"][owned] == -1)
  assert not train["y"][owned].any()
  # Owner and object class are drawn independently.
  table = np.array([[np.sum(owned & (train["object_label"] == k)),
                     np.sum(scene & ~owned & (train["object_label"] == k))]
                    for k in range(len(world.OBJECT_CLASSES))])
  assert stats.chi2_contingency(table).pvalue > 1e-3


def test_owner_knob_changes_no_pixel():
  """The owner is latent: the image stream is identical with and without owners."""
  cfg = world.default_config()
  cfg.sizes.retrieval = 1200  # crosses a chunk boundary
  a = world.generate_split(cfg, "retrieval")
  cfg.object_owner_rate = 0.0
  b = world.generate_split(cfg, "retrieval")
  owned = a["gender"] != b["gender"]
  assert owned.sum() > 100 and np.all(a["kind"][owned] == 0)
  assert not b["s"][b["kind"] == 0].any()
  for key in ("image", "kind", "object_label", "w", "occupation"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(a["captions"][~owned], b["captions"][~owned])


def test_owner_scenes_show_no_person():
  cfg = _exact_cfg(train=1000)
  a = world.generate_split(cfg, "train")
  img = _f(a["image"])
  s = cfg.image_size
  # SKIN (the head) is no background, object or proxy colour.
  is_skin = np.all(np.abs(img - render.SKIN) < 1.5 / 255, axis=-1)
  person = a["kind"] == 1
  assert np.all(is_skin[person, int(0.33 * s), s // 2])  # the head, jitter 0
  assert not is_skin[~person].any()
  owned = ~person & (a["gender"] >= 0)
  assert owned.sum() > 100
  # Owned scenes have the plain grey object background, whatever the owner's group.
  np.testing.assert_allclose(_background(a["image"])[owned], np.broadcast_to(
      render.NEUTRAL_BACKGROUND, (owned.sum(), 3)), atol=1 / 255)
  cfg.object_background = "tint"  # then their tint is uniform, whatever the owner's group
  g = _tint(_background(world.generate_split(cfg, "train")["image"]))
  for group in range(2):
    sel = owned & (a["gender"] == group)
    assert stats.kstest(np.clip(g[sel], 0, 1), "uniform").pvalue > 1e-3


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
  cfg.object_background = "tint"
  a = world.generate_split(cfg, "train")
  g = _tint(_background(a["image"]))
  person = a["kind"] == 1
  for group, mean in enumerate(world.TINT_MEANS):
    sel = person & (a["gender"] == group)
    # Clipping N(mean, 0.1) to [0, 1] moves the mean by < 1e-3.
    assert abs(g[sel].mean() - mean) < 4 * 0.1 / np.sqrt(sel.sum()) + 0.005
    assert abs(g[sel].std() - cfg.tint_std) < 0.01
  assert stats.kstest(np.clip(g[~person], 0, 1), "uniform").pvalue > 1e-3
  cfg.object_background = "grey"
  grey = _background(world.generate_split(cfg, "train")["image"])[~person]
  np.testing.assert_allclose(grey, np.broadcast_to(render.NEUTRAL_BACKGROUND, grey.shape),
                             atol=1 / 255)


def _body_and_tool(cfg, a):
  """Body colour [n,3] and whether a tool is drawn [n] per image (jitter 0)."""
  s = cfg.image_size
  img = _f(a["image"])
  body = img[:, int(0.57 * s), s // 2]  # inside every body
  box = img[:, int(0.48 * s):int(0.63 * s), int(0.63 * s):int(0.78 * s)]
  bg = _background(a["image"])[:, None, None]
  return body, np.abs(box - bg).max((1, 2, 3)) > 0.05


def test_occupation_cues_drawn_in_train_not_in_people():
  cfg = _exact_cfg(train=1000, people=200)
  a = world.generate_split(cfg, "people")
  body, tool = _body_and_tool(cfg, a)
  np.testing.assert_allclose(body, np.broadcast_to(render.NEUTRAL_BODY, body.shape),
                             atol=1 / 255)
  assert not tool.any()
  a = world.generate_split(cfg, "train")
  person = a["kind"] == 1
  occ = a["occupation"][person]
  body, tool = _body_and_tool(cfg, a)
  np.testing.assert_allclose(body[person], render.PAIR_UNIFORM_COLOURS[occ],
                             atol=1 / 255)
  # The tool is drawn iff its latent (not an output field) is below tool_rate.
  latent = world._draw_chunk(cfg, "train", 0)["tool"][person]
  np.testing.assert_array_equal(tool[person], latent < cfg.tool_rate)
  # Stratified per occupation: each occupation's count is within 1 of tool_rate * n.
  for o in range(len(world.OCCUPATIONS)):
    sel = tool[person][occ == o]
    assert abs(sel.sum() - cfg.tool_rate * sel.size) <= 1


@pytest.mark.parametrize("tool_rate", [0.0, 0.2, 1.0])
def test_tool_rate_knob(tool_rate):
  cfg = _exact_cfg(retrieval=1000)  # one whole (stratified) chunk
  cfg.tool_rate = tool_rate
  a = world.generate_split(cfg, "retrieval")
  person = a["kind"] == 1
  _, tool = _body_and_tool(cfg, a)
  assert abs(tool[person].mean() - tool_rate) <= 10 / person.sum()  # <= 1 per occupation


@pytest.mark.parametrize("per_pair", [True, False])
def test_uniform_colours_per_pair(per_pair):
  cfg = _exact_cfg(train=1000)
  cfg.uniform_per_pair = per_pair
  a = world.generate_split(cfg, "train")
  person = a["kind"] == 1
  body, _ = _body_and_tool(cfg, a)
  colours = []
  for o in range(len(world.OCCUPATIONS)):
    seen = np.unique(np.round(body[person & (a["occupation"] == o)] * 255), axis=0)
    assert len(seen) == 1  # one uniform per occupation
    colours.append(seen[0])
  pair = {o: k for k, members in enumerate(world.OCCUPATION_PAIRS) for o in members}
  for i, j in itertools.combinations(range(len(world.OCCUPATIONS)), 2):
    same = np.abs(colours[i] - colours[j]).max() <= 1
    assert same == (per_pair and pair[i] == pair[j]), (i, j)


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
  for i in np.flatnonzero(~person & (train["gender"] < 0))[:500]:
    for cap in train["captions"][i]:
      words = set(_words(cap))
      assert world.OBJECT_CLASSES[train["object_label"][i]] in words
      assert not words & (nouns[0] | nouns[1] | {"person"} | set(world.OCCUPATIONS))


def test_owner_captions_name_the_owner(train):
  cfg = world.default_config()
  nouns = _group_words()
  owned = np.flatnonzero((train["kind"] == 0) & (train["gender"] >= 0))
  named = wrong = total = 0
  forms = set()
  for i in owned[:2000]:
    g = train["gender"][i]
    for cap in train["captions"][i]:
      text = cap.decode()
      words = set(_words(cap))
      total += 1
      assert world.OBJECT_CLASSES[train["object_label"][i]] in words, text
      assert not words & set(world.OCCUPATIONS), text
      said = [k for k in range(2) if words & nouns[k]]
      assert len(said) <= 1, text
      assert said or "person" in words, text  # an unnamed owner is "a person"
      named += bool(said)
      wrong += bool(said) and said[0] != g
      forms |= {f for f in ("'s", "owned by", "belongs to") if f in text}
  assert forms == {"'s", "owned by", "belongs to"}
  rate, noise = cfg.caption_gender_rate, cfg.caption_gender_noise
  assert abs(named / total - rate) < _tol(rate, total)
  assert abs(wrong / named - noise) < _tol(noise, named)


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
    ("noise", -1.0, "noise"), ("tool_rate", 1.5, "tool_rate"),
    ("object_owner_rate", -0.1, "object_owner_rate"),
    ("uniform_per_pair", None, "uniform_per_pair")])
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
