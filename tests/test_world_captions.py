"""Tests for the world's descriptive captions (captions='descriptive') and caption helpers."""
import re

import numpy as np
import pytest

from siglip_fair.annotate import lexicon
from siglip_fair.data import captions
from siglip_fair.data import render
from siglip_fair.data import scenes
from siglip_fair.data import world


def _cfg(scenes_mode="composed", style="descriptive", **knobs):
  cfg = world.default_config()
  cfg.object_scenes = scenes_mode
  cfg.object_background = "varied"
  cfg.captions = style
  for knob, value in knobs.items():
    cfg[knob] = value
  return cfg


def test_descriptive_captions_identify_their_images():
  legacy = world.generate_split(world.default_config(), "retrieval")
  a = world.generate_split(_cfg(objects_per_scene_max=3), "retrieval")
  scene = a["kind"] == 0
  share = captions.unique_caption_share
  # Measured: legacy 0.355; descriptive 0.859 overall, 1.0 on object scenes and 0.72 on people,
  # whose images show little besides occupation, tool and proxies.
  assert share(legacy["captions"]) < 0.45
  assert share(a["captions"]) > 0.8
  assert share(a["captions"][scene]) > 0.97 and share(a["captions"][~scene]) > 0.65
  composed_legacy = world.generate_split(_cfg(style="legacy"), "retrieval")
  assert share(composed_legacy["captions"]) < 0.5


def test_captions_knob_keeps_every_planted_decision_and_pixel():
  """Group, occupation and proxy words are the legacy captions' exactly, caption by caption
  (as a keyword annotator reads them), and no pixel or label moves."""
  cfg = _cfg(objects_per_scene_max=3, style="legacy")
  cfg.sizes.train = 3000
  a = world.generate_split(cfg, "train")
  cfg.captions = "descriptive"
  b = world.generate_split(cfg, "train")
  for key in a:
    if key != "captions":
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(a["captions"], b["captions"])
  lex = lexicon.default_lexicon_config()
  got = lexicon.annotate_captions(b["captions"].reshape(-1), lex)
  want = lexicon.annotate_captions(a["captions"].reshape(-1), lex)
  for field in ("s", "y", "w", "known"):
    np.testing.assert_array_equal(got[field], want[field], err_msg=field)
  for split in ("people", "objects"):
    cfg.sizes[split] = 200
  cfg.captions = "legacy"
  people = world.generate_split(cfg, "people")["captions"]
  cfg.captions = "descriptive"
  np.testing.assert_array_equal(world.generate_split(cfg, "people")["captions"], people)


_NOUN = re.compile(r"(?:({}) )?(?:({}) )?(?:({}) )?(?:({}) )?({})\b".format(
    "|".join(scenes.COUNT_WORDS), "|".join(scenes.SIZES), "|".join(scenes.PATTERNS),
    "|".join(scenes.COLOUR_NAMES), "|".join(scenes.SHAPE_PLURALS + scenes.SHAPES)))
_BACKGROUND = re.compile(r" on an? (.+?)(?: background)?$")


def test_object_captions_describe_what_is_drawn():
  cfg = _cfg(objects_per_scene_max=3)
  cfg.sizes.retrieval = 2000
  a = world.generate_split(cfg, "retrieval")
  attrs = world.scene_attributes(cfg, "retrieval")
  rate = cfg.caption_attribute_rate
  named = dict(size=0, pattern=0, position=0, background=0)
  total = 0
  for i in np.flatnonzero(a["kind"] == 0):
    count = attrs["count"][i]
    cells = sorted(zip(attrs["column"][i, :count], attrs["row"][i, :count]))
    where = [scenes.POSITION_PHRASES[r][c] for c, r in cells]
    for cap in a["captions"][i]:
      text = cap.decode().split(" next to ")[0]  # proxies and their positions come after
      total += 1
      m = _NOUN.search(text)
      number, size, pattern, colour, shape = m.groups()
      plural = shape in scenes.SHAPE_PLURALS
      assert (number is not None) == plural == (count > 1), text
      if number:
        assert scenes.COUNT_WORDS.index(number) == count - 1, text
      words = scenes.SHAPE_PLURALS if plural else scenes.SHAPES
      assert words.index(shape) == attrs["shape"][i], text
      assert colour == scenes.COLOUR_NAMES[attrs["colour"][i]], text  # defines the class
      for key, value, words in (("size", size, scenes.SIZES), ("pattern", pattern,
                                                                 scenes.PATTERNS)):
        named[key] += value is not None
        assert value is None or words.index(value) == attrs[key][i], text
      said = [p for p in sum(scenes.POSITION_PHRASES, ()) if p in text]
      said = [p for p in said if not any(p != q and p in q for q in said)]  # "at the top" in
      assert not said or sorted(said) == sorted(where), (text, where)
      named["position"] += bool(said)
      bg = _BACKGROUND.search(text)
      named["background"] += bool(bg)
      if bg:
        assert bg.group(1) == scenes.BACKGROUND_NAMES[attrs["background"][i]], text
  for key, n in named.items():
    assert abs(n / total - rate) < 4 * np.sqrt(rate * (1 - rate) / total), key


def test_person_captions_describe_uniform_tool_and_proxy_positions():
  cfg = _cfg()
  cfg.sizes.train = 2000
  a = world.generate_split(cfg, "train")
  tool = np.concatenate([world._draw_chunk(cfg, "train", c)["tool"] for c in range(2)])  # pylint: disable=protected-access
  uniforms = holding = total = 0
  for i in np.flatnonzero(a["kind"] == 1):
    o = a["occupation"][i]
    for cap in a["captions"][i]:
      text = cap.decode()
      total += 1
      m = re.search(r" in an? (\w+) uniform", text)
      uniforms += bool(m)
      if m:
        assert m.group(1) == captions.UNIFORM_COLOUR_NAMES[o - o % 2], text  # per pair
      m = re.search(r" holding an? (\w+)", text)
      holding += bool(m)
      if m:
        assert tool[i] < cfg.tool_rate, text  # only a drawn tool
        assert m.group(1) == captions.TOOL_NAMES[render.TOOL_SHAPES[o]], text
      for j, proxy in enumerate(world.PROXIES):
        for where in re.findall(rf"\b{proxy} ((?:in|at) the [a-z ]+?)(?=,| and |$)", text):
          assert where == captions._proxy_position(j), text  # pylint: disable=protected-access
          assert a["w"][i, j]
  rate = cfg.caption_attribute_rate
  assert abs(uniforms / total - rate) < 4 * np.sqrt(rate * (1 - rate) / total)
  assert 0.3 * rate < holding / total < 0.7 * rate  # tool_rate 0.5 of the people


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_caption_attribute_rate_extremes(rate):
  cfg = _cfg(caption_attribute_rate=rate, objects_per_scene_max=2)
  cfg.sizes.objects = 100
  a = world.generate_split(cfg, "objects")
  words = (*scenes.SIZES, *scenes.PATTERNS, " on a", " in the ", " at the ", " on the ")
  for row in a["captions"]:
    texts = [c.decode().split(" next to ")[0] for c in row]
    hits = [sum(w in t for w in words) for t in texts]
    if rate == 0.0:
      assert hits == [0] * len(texts), texts
    else:
      assert all(h >= 4 for h in hits), texts  # size, pattern, position, background


def test_legacy_captions_of_composed_scenes_name_the_class():
  cfg = _cfg(style="legacy", object_class_mode="shape_colour_pattern")
  cfg.sizes.objects = 300
  a = world.generate_split(cfg, "objects")
  names = world.object_class_names(cfg)
  for label, row in zip(a["object_label"], a["captions"]):
    for cap in row:
      assert names[label] in cap.decode(), cap


@pytest.mark.parametrize("knobs", [
    dict(), dict(objects_per_scene_max=3, object_shapes=10, object_colours=10),
    dict(object_class_mode="shape", object_background="grey"),
    dict(object_class_mode="shape_colour_pattern", object_background="tint"),
    dict(object_scenes="legacy", caption_attribute_rate=1.0, uniform_per_pair=False)])
def test_caption_alphabet_covers_every_caption(knobs):
  cfg = _cfg(**knobs)
  cfg.sizes.retrieval = 1000
  alphabet = world.caption_alphabet()
  for split in ("retrieval", "objects"):
    caps = world.generate_split(cfg, split)["captions"].reshape(-1)
    assert set(b"".join(caps).decode()) <= alphabet
  assert len(alphabet) + 3 <= 320  # the default tokenizer vocabulary still fits
  # Every word of the new vocabularies is in it.
  assert set("".join(captions.alphabet_words())) <= alphabet


def test_unique_caption_share():
  caps = np.array([[b"a", b"a"], [b"b", b"c"], [b"c", b"d"]], dtype=object)
  # "a" twice in one image is still that image's own; "c" is shared by two images.
  assert captions.unique_caption_share(caps) == pytest.approx(4 / 6)
