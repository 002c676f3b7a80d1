"""Zero-shot image annotation with fake towers on small in-memory sources.

As in test_evaluators.py, the fake image tower reads a planted vector out of
the pixels (undoing the [-1, 1] normalisation) and the fake text tower is a bag
of words with one axis per known word. Expected values are recomputed from the
planted pixels with brute-force numpy loops.
"""
import fake_towers
import ml_collections
import numpy as np
import pytest

from siglip_fair import annotate
from siglip_fair.annotate import zeroshot as zs
from siglip_fair.data import world

D = 24  # = pixels of a [2, 4, 3] image
# Groups on axes 0-1, occupations 2-11, proxies 12-21; "physician" is an extra
# synonym of "doctor" on its own axis, so ensembling over synonyms matters.
AXIS = {"man": 0, "male": 0, "gentleman": 0, "woman": 1, "female": 1, "lady": 1,
        **{o: 2 + i for i, o in enumerate(world.OCCUPATIONS)},
        **{p: 12 + i for i, p in enumerate(world.PROXIES)}, "physician": 22}
BATCH = 8
T = 10.0
LABEL_WORDS = {"doctor": ["doctor", "physician"]}


def BagOfWords():  # noqa: N802 (a factory standing in for the class)
  return fake_towers.BagOfWords(AXIS, 8)


_unit = fake_towers.unit


def _params():
  return {"words": fake_towers.word_table(AXIS, D), "t": T}


class FakeTowers:
  """Embedders that record every batch shape they are called with."""

  def __init__(self):
    self.image_shapes, self.text_shapes = [], []

  def embed_images(self, params, images):
    self.image_shapes.append(images.shape)
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1
    pixels = (images + 1.0) * 127.5
    real = np.any(images != 0, axis=(1, 2, 3))  # padding rows are all zero
    np.testing.assert_allclose(pixels[real], np.round(pixels[real]), atol=1e-3)
    emb = _unit(np.round(pixels).reshape(len(images), -1) / 255.0)
    emb[~real] = 7.0  # padding that leaked into outputs would stand out
    return emb

  def embed_texts(self, params, tokens):
    self.text_shapes.append(tokens.shape)
    return _unit(params["words"][tokens].sum(1))


def _source(n=21, seed=0):
  """Records with planted group/occupation/proxy pixels.

  Returns (records, planted gender [n], planted occupation [n], margin kind
  [n] in {'clear', 'tiny', 'tie'}).
  """
  rng = np.random.default_rng(seed)
  records, gender, occ, kinds = [], [], [], []
  for i in range(n):
    flat = np.zeros(D, np.uint8)
    g, o = rng.integers(2), rng.integers(10)
    kind = ("clear", "clear", "tiny", "clear", "tie")[i % 5]
    flat[g], flat[1 - g] = dict(clear=(220, 20), tiny=(101, 100),
                                tie=(100, 100))[kind]
    flat[2:12] = rng.integers(0, 150, 10)
    flat[2 + o] = 250
    flat[12:22] = rng.integers(0, 256, 10)
    records.append({"image": flat.reshape(2, 4, 3), "kind": np.int32(1)})
    gender.append(g), occ.append(o), kinds.append(kind)
  return records, np.array(gender), np.array(occ), np.array(kinds)


def _set_vectors(word_sets):
  """Brute-force prompt ensembles: mean of word axes (templates add nothing)."""
  out = []
  for words in word_sets.values():
    v = np.zeros(D)
    for w in words:
      v[AXIS[w]] += 1.0 / len(words)
    out.append(v / np.linalg.norm(v))
  return np.array(out)


def _brute(records, cfg):
  """Reference annotations by explicit loops over images and columns."""
  x = _unit(np.array([r["image"].reshape(-1) for r in records], np.float64))
  groups = _set_vectors(dict(cfg.group_words))
  labels = _set_vectors({o: LABEL_WORDS.get(o, [o]) for o in world.OCCUPATIONS})
  proxies = _set_vectors({p: [p] for p in world.PROXIES})
  n = len(x)
  probs, margin = np.zeros((n, 2)), np.zeros(n)
  y, w = np.zeros((n, 10)), np.zeros((n, 10))
  for i in range(n):
    logits = [T * float(x[i] @ g) for g in groups]
    z = sum(np.exp(l) for l in logits)
    probs[i] = [np.exp(l) / z for l in logits]
    margin[i] = abs(probs[i][0] - probs[i][1])
    y[i, int(np.argmax([x[i] @ l for l in labels]))] = 1
    sims = [float(x[i] @ p) for p in proxies]
    for j in range(10):
      w[i, j] = sims[j] - np.mean(sims) > cfg.proxy_threshold
  return probs, margin, y, w


def _cfg(**kw):
  cfg = zs.default_config()
  cfg.batch_size = BATCH
  cfg.label_words = LABEL_WORDS
  cfg.fields = ("s", "y", "w")
  cfg.update(kw)
  return cfg


def _annotator(cfg, towers=None):
  towers = towers or FakeTowers()
  return zs.ZeroShotAnnotator(towers.embed_images, towers.embed_texts,
                              BagOfWords(), lambda p: p["t"], cfg), towers


def test_default_config():
  cfg = zs.default_config()
  assert tuple(cfg.group_words) == world.GROUPS
  assert tuple(cfg.fields) == ("s",) and cfg.min_margin == 0.0
  assert cfg.batch_size == 256


def test_group_scores_match_brute_force_softmax():
  rng = np.random.default_rng(1)
  img, grp = rng.normal(size=(9, 5)), rng.normal(size=(3, 5))
  p = zs.group_scores(img, grp, 4.0)
  assert p.shape == (9, 3) and p.dtype == np.float32
  for i in range(9):
    sims = [img[i] @ g / np.linalg.norm(img[i]) / np.linalg.norm(g) for g in grp]
    e = [np.exp(4.0 * s) for s in sims]
    np.testing.assert_allclose(p[i], [v / sum(e) for v in e], rtol=1e-5)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
  # Large logits stay finite.
  assert np.all(np.isfinite(zs.group_scores(img, grp, 1e4)))


def test_planted_images_annotated_like_brute_force():
  records, gender, occ, kinds = _source()
  cfg = _cfg(min_margin=0.05)
  ann, _ = _annotator(cfg)
  out = ann.annotate(_params(), records)
  annotate.validate_annotations(out)
  probs, margin, y, w = _brute(records, cfg)
  clear = kinds == "clear"
  assert margin[clear].min() > 0.05 > margin[kinds == "tiny"].max()
  np.testing.assert_array_equal(out["known"], clear)
  np.testing.assert_array_equal(out["s"][clear],
                                np.eye(2)[gender[clear]])
  np.testing.assert_array_equal(out["s"][~clear], 0)
  np.testing.assert_array_equal(out["y"], y)
  np.testing.assert_array_equal(out["y"].argmax(1), occ)  # planted labels
  np.testing.assert_array_equal(out["w"], w)
  assert 0 < out["w"].sum() < out["w"].size
  np.testing.assert_array_equal(out["u"], 0)
  # Without a margin requirement tiny margins count; exact ties never do.
  out0 = _annotator(_cfg())[0].annotate(_params(), records)
  np.testing.assert_array_equal(out0["known"], kinds != "tie")
  np.testing.assert_array_equal(
      out0["s"][kinds != "tie"], np.eye(2)[probs.argmax(1)][kinds != "tie"])
  np.testing.assert_array_equal(out0["y"], y)


def test_proxy_threshold_and_unrequested_fields():
  records, *_ = _source()
  cfg = _cfg(proxy_threshold=0.1)
  out = _annotator(cfg)[0].annotate(_params(), records)
  np.testing.assert_array_equal(out["w"], _brute(records, cfg)[3])
  only_s = _annotator(_cfg(fields=("s",)))[0].annotate(_params(), records)
  assert only_s["y"].shape == (21, 10) and only_s["w"].shape == (21, 10)
  assert not only_s["y"].any() and not only_s["w"].any()
  only_y = _annotator(_cfg(fields=("y",)))[0].annotate(_params(), records)
  assert not only_y["known"].any() and not only_y["s"].any()
  np.testing.assert_array_equal(only_y["y"], out["y"])


def test_fixed_batches_and_no_padding_leak():
  records, *_ = _source(n=21)
  ann, towers = _annotator(_cfg())
  emb = ann.image_embeddings(_params(), records)
  assert [s[0] for s in towers.image_shapes] == [BATCH] * 3  # 21 = 8 + 8 + 5
  x = _unit(np.array([r["image"].reshape(-1) for r in records], np.float64))
  np.testing.assert_allclose(emb, x, atol=1e-6)
  out = ann.annotate(_params(), records)
  assert all(s[0] == BATCH for s in towers.image_shapes + towers.text_shapes)
  n_prompts = 3 * (6 + 11 + 10)  # templates x words of s, y (+physician), w
  assert n_prompts % BATCH and len(towers.text_shapes) >= 3
  prompt = ann.prompt_embeddings(_params())
  np.testing.assert_allclose(prompt["y"], _set_vectors(
      {o: LABEL_WORDS.get(o, [o]) for o in world.OCCUPATIONS}), atol=1e-6)
  assert all(v.shape[0] == 21 for v in out.values())


def test_combine_with_text_annotations():
  records, *_ = _source(n=10)
  image_ann = _annotator(_cfg())[0].annotate(_params(), records)
  caps = ["a photo of a woman nurse", "a red ball"] * 5
  text_ann = annotate.annotate_captions(caps, annotate.default_lexicon_config())
  for rule in annotate.RULES:
    out = annotate.combine(text_ann, image_ann, rule)
    for k in ("s", "known", "y", "w"):
      assert out[k].shape == image_ann[k].shape and out[k].dtype == np.float32
  merged = annotate.combine(text_ann, image_ann, "text_first")
  for i in range(10):
    src = text_ann if i % 2 == 0 else image_ann
    np.testing.assert_array_equal(merged["s"][i], src["s"][i])
    np.testing.assert_array_equal(merged["y"][i], src["y"][i])
  arrays = {"captions": np.array([[c.encode()] for c in caps], dtype=object)}
  split_cfg = annotate.default_config()
  split_cfg.source, split_cfg.rule = "combined", "either"
  out = annotate.annotate_split(arrays, split_cfg, image_ann=image_ann)
  np.testing.assert_array_equal(
      out["known"], np.maximum(text_ann["known"], image_ann["known"]))


def test_agreement_matches_hand_count():
  eye = np.eye(10, dtype=np.float32)
  pred = dict(s=np.array([[1, 0], [0, 1], [0, 0], [1, 0], [0, 1]], np.float32),
              known=np.array([1, 1, 0, 1, 1], np.float32),
              y=eye[[0, 1, 2, 3, 0]], w=np.zeros((5, 10), np.float32))
  truth = dict(s=np.array([[1, 0], [1, 0], [0, 1], [0, 0], [0, 1]], np.float32),
               known=np.array([1, 1, 1, 0, 1], np.float32),
               y=eye[[0, 1, 3, 3, 1]], w=np.zeros((5, 10), np.float32))
  got = zs.agreement(pred, truth)
  # Both known on rows 0, 1, 4; groups agree on 0 and 4.
  assert got["s/accuracy"] == pytest.approx(2 / 3)
  assert got["coverage"] == pytest.approx(0.8)
  assert got["s/man/precision"] == pytest.approx(1 / 2)  # rows 0, 3 vs 0, 1
  assert got["s/woman/recall"] == pytest.approx(1 / 2)  # rows 1, 4 vs 2, 4
  assert got["known/precision"] == pytest.approx(3 / 4)
  assert got["y/micro/precision"] == pytest.approx(3 / 5)  # rows 0, 1, 3
  assert got["y/librarian/precision"] == pytest.approx(1 / 2)
  none = dict(pred, known=np.zeros(5, np.float32))
  assert np.isnan(zs.agreement(none, truth)["s/accuracy"])


def test_errors():
  records, *_ = _source(n=3)
  ann, _ = _annotator(_cfg())
  with pytest.raises(ValueError, match="no 'image' field"):
    ann.annotate(_params(), [{"pixels": r["image"]} for r in records])
  with pytest.raises(ValueError, match="source is empty"):
    ann.annotate(_params(), [])
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['z'\]"):
    _annotator(_cfg(fields=("s", "z")))
  with pytest.raises(ValueError, match="temperature must be .* > 0"):
    zs.group_scores(np.ones((2, 3)), np.ones((2, 3)), 0.0)
  with pytest.raises(ValueError, match="temperature must be .* > 0"):
    ann.annotate(dict(_params(), t=-1.0), records)
  with pytest.raises(ValueError, match=r"label_words has unknown name\(s\)"):
    _annotator(_cfg(label_words={"astronaut": ["astronaut"]}))
  with pytest.raises(ValueError, match="prompt_embs lacks field 'y'"):
    zs.infer_attributes(np.ones((2, D)), {"s": np.eye(2, D)}, T, _cfg())
