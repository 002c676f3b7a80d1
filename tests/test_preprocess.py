"""Preprocessing as config (data/preprocess.py, data/tokenizer.py, models/released.py) against
the reference implementations: transformers' own PIL image processors and tokenizers
(SiglipImageProcessorPil / CLIPImageProcessorPil from kwargs, SiglipTokenizer on a
sentencepiece model and CLIPTokenizer on a byte-level BPE this test writes; nothing is
downloaded), torch's bilinear resize for big_vision's TF resize, and end to end: a random
SiglipModel / CLIPModel folder with its processor and tokenizer gives the same embeddings from
the same raw pixels and strings through each side's own preprocessing.
"""
import json

import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from siglip_fair.data import preprocess as pp
from siglip_fair.data import tokenizer as tok_lib
from siglip_fair.models import big_vision, make_model, released

from test_hf import reference_model

WORDS = "a photo of the man woman nurse doctor with red blue hat book laptop cat dog on in".split()
ODD = ["Photo", "DOG", "cat,", "hat.", "(red)", "it's", "x-ray", "Zürich", "  ", "\t", "42", "!?",
       "naïve", "日本", "A  Man"]


def random_texts(seed, n=120):
  """Strings mixing the tokenizers' words with case, punctuation, digits, Unicode and odd
  whitespace, of 0 to 13 words (longer than the rows, to exercise truncation)."""
  rng = np.random.default_rng(seed)
  texts = [" ".join(str(rng.choice(WORDS + ODD)) for _ in range(rng.integers(0, 14)))
           for _ in range(n)]
  return texts + ["", " ", "A", "....", "hello   World!!"]


def random_images(seed):
  """Raw uint8 images of assorted shapes (landscape, portrait, tiny, already square)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
          for h, w in [(30, 40), (17, 9), (64, 64), (5, 100), (16, 16), (41, 23)]]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """A cased SentencePiece model in T5's id convention (pad 0, </s> 1, <unk> 2), as c4_en."""
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 6)) for _ in range(300)]
  path = str(tmp_path_factory.mktemp("spm") / "s.model")
  return tok_lib.train_sentencepiece(iter(corpus), 60, path, normalization="nmt_nfkc")


def clip_bpe():
  """(vocab, merges) of a tiny CLIP-style byte-level BPE: the 256 byte symbols with and
  without '</w>', each of WORDS merged left to right, the two special tokens last."""
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet])}
  merges = []
  for word in WORDS:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      if (symbols[0], symbols[1]) not in merges:
        merges.append((symbols[0], symbols[1]))
      symbols = [symbols[0] + symbols[1]] + symbols[2:]
      vocab.setdefault(symbols[0], len(vocab))
  for token in ("<|startoftext|>", "<|endoftext|>"):
    vocab[token] = len(vocab)
  return vocab, merges


# ---- images ----

@pytest.mark.parametrize("family,processor,kwargs", [
    ("siglip_hf", transformers.SiglipImageProcessorPil, dict(size={"height": 24, "width": 24})),
    ("clip", transformers.CLIPImageProcessorPil,
     dict(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})),
    ("clip", transformers.CLIPImageProcessorPil,  # another filter and normalisation
     dict(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12}, resample=2,
          image_mean=[0.2, 0.5, 0.7], image_std=[0.3, 0.25, 0.6])),
])
def test_pixels_match_transformers_image_processors(tmp_path, family, processor, kwargs):
  reference = processor(**kwargs)
  reference.save_pretrained(tmp_path)
  with open(tmp_path / "preprocessor_config.json") as f:
    image = pp.preset(family).image
    pp.apply_hf_processor(image, json.load(f))
  assert image.size == kwargs["size"].get("height", kwargs["size"].get("shortest_edge"))
  worst = 0.0
  for raw in random_images(1):
    theirs = reference(raw, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = pp.pixels([raw], image)[0]
    assert ours.shape == theirs.shape
    worst = max(worst, float(np.abs(ours - theirs).max()))
  # The same PIL resize on the same uint8 pixels: only float rounding of the normalisation
  # differs (transformers scales in float64; we map [-1, 1] by an affine in float32).
  print(f"{family} {kwargs}: max |pixel diff| {worst:.1e}")
  assert worst <= 1e-5


def test_tf_bilinear_is_torch_bilinear_without_antialias():
  """big_vision's resize(S): tf.image.resize(bilinear, antialias=False) with half-pixel
  centres, then a truncating cast to uint8. torch's interpolate(bilinear, align_corners=False,
  antialias=False) samples at the same points; it runs in float64 here, while TF (and we)
  compute sample positions and lerps in float32, so float values agree to 1e-2 (of 255) and
  truncated pixels wherever the exact value is not within that of an integer."""
  worst, compared = 0.0, 0
  for raw, size in zip(random_images(2), [(24, 24), (24, 24), (9, 7), (16, 16), (37, 37), (8, 8)]):
    ours = pp.tf_bilinear(raw, size)
    torch_in = torch.from_numpy(raw.astype(np.float64).transpose(2, 0, 1)[None])
    ref = torch.nn.functional.interpolate(torch_in, size=size, mode="bilinear",
                                          align_corners=False, antialias=False)
    ref = ref[0].numpy().transpose(1, 2, 0)
    worst = max(worst, float(np.abs(ours - ref).max()))
    clear = np.abs(ref - np.round(ref)) > 1e-2
    truncated = pp.resize(raw, size, "tf_bilinear")
    np.testing.assert_array_equal(truncated[clear], np.floor(ref[clear]).astype(np.uint8))
    compared += int(clear.sum())
  print(f"tf_bilinear vs torch float64: max |diff| {worst:.1e}; {compared} pixels compared")
  assert worst <= 1e-2 and compared > 5000
  # Upsampling by 2 puts every sample at a quarter pixel: exact in float32, no rounding at all.
  raw = random_images(3)[4]
  torch_in = torch.from_numpy(raw.astype(np.float32).transpose(2, 0, 1)[None])
  ref = torch.nn.functional.interpolate(torch_in, size=(32, 32), mode="bilinear",
                                        align_corners=False, antialias=False)
  np.testing.assert_array_equal(pp.tf_bilinear(raw, (32, 32)), ref[0].numpy().transpose(1, 2, 0))


def test_big_vision_image_rule_and_unit_range():
  image = pp.preset("siglip").image
  image.size = 16
  raw = random_images(4)[0]
  want = np.clip(pp.tf_bilinear(raw, (16, 16)), 0, 255).astype(np.uint8)  # squash, no crop
  np.testing.assert_array_equal(pp.prepare(raw, image), want)
  # value_range(-1, 1): p / 255 * 2 - 1, what normalize's identity affine keeps.
  np.testing.assert_allclose(pp.pixels([raw], image)[0], want / 255.0 * 2 - 1, atol=1e-6)
  assert pp.unit_range_affine(*pp.UNIT_RANGE) is None
  a, b = pp.unit_range_affine(pp.OPENAI_MEAN, pp.OPENAI_STD)
  x = np.linspace(-1, 1, 11)[:, None]
  np.testing.assert_allclose(x * a + b, ((x + 1) / 2 - pp.OPENAI_MEAN) / pp.OPENAI_STD, rtol=1e-6)
  # Grey and RGBA inputs become RGB; float inputs are refused, not rescaled twice.
  grey = raw[..., 0]
  np.testing.assert_array_equal(pp.prepare(grey, image), pp.prepare(np.repeat(grey[..., None], 3,
                                                                               -1), image))
  with pytest.raises(ValueError, match="uint8"):
    pp.prepare(raw.astype(np.float32), image)


# ---- tokenizers ----

def test_siglip_tokenizer_matches_transformers(spm_path):
  texts = random_texts(5)
  reference = transformers.SiglipTokenizer(vocab_file=spm_path, model_max_length=16)
  theirs = np.array(reference(texts, padding="max_length", max_length=16,
                              truncation=True)["input_ids"])
  spec = pp.preset("siglip_hf").text
  spec.update(path=spm_path, max_len=16)
  ours = tok_lib.make_tokenizer(spec).encode(texts)
  assert (theirs == 1).any(axis=1).all() and (theirs[:, -1] == 1).all()  # sticky EOS, EOS pad
  np.testing.assert_array_equal(ours, theirs)


def test_clip_tokenizer_json_matches_transformers(tmp_path):
  vocab, merges = clip_bpe()
  reference = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  reference.save_pretrained(tmp_path)
  texts = random_texts(6)
  theirs = np.array(reference(texts, padding="max_length", max_length=12,
                              truncation=True)["input_ids"])
  spec = pp.preset("clip").text
  spec.update(path=str(tmp_path / "tokenizer.json"), max_len=12)
  tok = tok_lib.make_tokenizer(spec)
  ours = tok.encode(texts)
  assert (ours[:, 0] == vocab["<|startoftext|>"]).all()
  np.testing.assert_array_equal(ours, theirs)
  assert tok.decode(tok.encode(["a photo of a Cat"])) == ["a photo of a cat"]
  # OpenAI's clip.tokenize pads with id 0 instead: only the padding differs.
  spec.pad_token = ""
  zero = tok_lib.make_tokenizer(spec).encode(texts)
  after_eos = np.cumsum(theirs == vocab["<|endoftext|>"], axis=1) - (
      theirs == vocab["<|endoftext|>"]) > 0
  np.testing.assert_array_equal(zero[~after_eos], theirs[~after_eos])
  assert (zero[after_eos] == 0).all()


def test_big_vision_text_rules(spm_path):
  """big_vision's tokenize(eos='sticky', pad_value=1) for SigLIP and SigLIP 2's
  lower|tok(bos='no', eos='sticky') padded with the pad piece, from sentencepiece directly."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  raw = spm.SentencePieceProcessor(model_file=spm_path)
  texts = random_texts(7, 40)
  for family, lower, pad in (("siglip", False, 1), ("siglip2", True, 0)):
    spec = pp.preset(family).text
    spec.update(path=spm_path, max_len=10, eos_token="</s>")  # T5's EOS stands in for '<eos>'
    got = tok_lib.make_tokenizer(spec).encode(texts)
    for row, text in zip(got, texts):
      ids = raw.encode(text.lower() if lower else text)[:9] + [1]
      np.testing.assert_array_equal(row, ids + [pad] * (10 - len(ids)), err_msg=family)


def test_tokenizer_config_errors(spm_path, tmp_path):
  spec = pp.preset("siglip").text
  spec.update(path=spm_path, max_len=8, pad_token="<nope>")
  with pytest.raises(ValueError, match="no piece '<nope>'"):
    tok_lib.make_tokenizer(spec)
  spec.update(pad_token="</s>", eos_token="<unk>")
  with pytest.raises(ValueError, match="eos_token='<unk>' is id 2"):
    tok_lib.make_tokenizer(spec)
  spec.update(eos_token="</s>", kind="wordpiece")
  with pytest.raises(ValueError, match="tokenizer.kind='wordpiece'"):
    tok_lib.make_tokenizer(spec)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
    tok_lib.HFTokenizer(str(tmp_path / "bad.json"), 8, eos_token="</s>")
  with pytest.raises(ValueError, match="preprocessing preset .openclip. is not known"):
    pp.preset("openclip")
  image = pp.preset("clip").image
  image.method = "area"
  with pytest.raises(ValueError, match="preprocess.method='area'"):
    pp.check_image_config(image)


# ---- released checkpoints end to end ----

def _siglip_folder(path, spm_path):
  """A random SiglipModel over the 60-piece spm with its processor and tokenizer."""
  case = dict(family="siglip", seed=3, image=16, patch=4, vision=(16, 2, 24, 2),
              text=(12, 2, 20, 3), vocab=60, max_len=16, act="gelu_pytorch_tanh", eps=1e-6)
  model = reference_model(case)
  model.save_pretrained(path)
  transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
  tokenizer = transformers.SiglipTokenizer(vocab_file=spm_path, model_max_length=16)
  tokenizer.save_pretrained(path)
  return model, transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16}), tokenizer


def _clip_folder(path):
  vocab, merges = clip_bpe()
  case = dict(family="clip", seed=4, image=12, patch=4, vision=(16, 2, 24, 2),
              text=(12, 2, 20, 3), vocab=len(vocab), max_len=12, act="quick_gelu", eps=1e-5,
              eos=vocab["<|endoftext|>"], proj=10)
  model = reference_model(case)
  model.save_pretrained(path)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 12},
                                                 crop_size={"height": 12, "width": 12})
  processor.save_pretrained(path)
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  tokenizer.save_pretrained(path)
  return model, processor, tokenizer


@pytest.mark.parametrize("family", ["siglip_hf", "clip"])
def test_same_embeddings_from_raw_pixels_and_strings(tmp_path, spm_path, family):
  folder = tmp_path / "ckpt"
  model, processor, tokenizer = (_siglip_folder(folder, spm_path) if family == "siglip_hf"
                                 else _clip_folder(folder))
  spec = released.resolve(str(folder))
  assert (spec.released.source, spec.released.family) == ("hf", family)
  images, texts = random_images(8), random_texts(9, 12)
  max_len = spec.model.text.max_len
  with torch.no_grad():
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    input_ids = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                          return_tensors="pt")["input_ids"]
    out = model(input_ids=input_ids, pixel_values=pixel_values)
  theirs = out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()

  ours_model = make_model(ml_collections.ConfigDict(spec.model))
  params = released.load_params(spec)
  ours_tokens = released.make_tokenizer(spec).encode(texts)
  np.testing.assert_array_equal(ours_tokens, input_ids.numpy())
  zimg, ztxt, extras = jax.jit(ours_model.apply)(
      {"params": params}, pp.images_at(images, spec.preprocess), ours_tokens)
  logits = extras["t"] * zimg @ ztxt.T + extras["b"]
  diffs = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip((zimg, ztxt, logits), theirs)]
  print(f"{family} raw -> embeddings: max |diff| image {diffs[0]:.1e}, text {diffs[1]:.1e}, "
        f"logits {diffs[2]:.1e}")
  assert max(diffs[:2]) <= 1e-4 and diffs[2] <= 1e-3
  if family == "clip":  # OpenAI's normalisation is the model's, on [-1, 1] input
    assert spec.model.image.pixel_mean == pp.OPENAI_MEAN
  else:
    assert "pixel_mean" not in spec.model.image


def test_released_overrides_and_errors(tmp_path, spm_path):
  folder = tmp_path / "ckpt"
  _siglip_folder(folder, spm_path)
  spec = released.resolve(str(folder), tokenizer=dict(lower=False, max_len=8),
                          image=dict(method="bilinear", size=None))
  assert (spec.tokenizer.lower, spec.tokenizer.max_len, spec.tokenizer.canonicalize) == (
      False, 8, True)
  assert (spec.preprocess.method, spec.preprocess.size) == ("bilinear", 16)
  assert released.make_tokenizer(spec).encode(["A Cat"]).shape == (1, 8)
  with pytest.raises(ValueError, match="unknown field 'lowercase'"):
    released.resolve(str(folder), tokenizer=dict(lowercase=True))
  # A tokenizer whose vocabulary does not fit the checkpoint's embedding table.
  big = tok_lib.train_sentencepiece(iter(random_texts(10, 400)), 200,
                                    str(tmp_path / "big.model"))
  spec = released.resolve(str(folder), tokenizer=dict(path=big))
  with pytest.raises(ValueError, match=r"has \d+ tokens but the checkpoint's text embedding "
                     "has 60 rows"):
    released.make_tokenizer(spec)
  # A resolution that needs position-embedding resizing when resizing is off.
  spec = released.resolve(str(folder), image=dict(size=24))
  with pytest.raises(ValueError, match=r"4x4 patch grid \(16 px at patch 4\), but 24 px images "
                     r"need 6x6.*resize_posemb"):
    released.load_params(spec)
  assert released.load_params(spec, resize_posemb=True)["img"]["pos_embedding"].shape == (
      1, 36, 16)
  with pytest.raises(ValueError, match="is a folder without config.json and model.safetensors"):
    released.resolve(str(tmp_path))


def big_vision_npz(path, *, max_len, scan=None):
  """A tiny big_vision SigLIP .npz with the released head structure (MAP pooling and no image
  head, a text head, text padding 'none'; 16 px images at patch 4, 60 tokens) at `path`:
  (its path, the params it holds). scan as in big_vision.save_npz."""
  config = ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4", pool="map", head="none"),
      text=dict(variant="mu", vocab_size=60, max_len=max_len, padding="none"), embed_dim=32))
  params = jax.jit(make_model(config).init)(jax.random.key(0), np.zeros((1, 16, 16, 3)),
                                            np.zeros((1, max_len), np.int32))["params"]
  return big_vision.save_npz(path, params, scan=scan), params


def test_big_vision_npz_resolves_to_its_preset(tmp_path, spm_path):
  path, params = big_vision_npz(tmp_path / "s.npz", max_len=10, scan=True)
  with pytest.raises(ValueError, match="carries no tokenizer.*tokenizer.path"):
    released.make_tokenizer(released.resolve(path))
  spec = released.resolve(path, tokenizer=dict(path=spm_path))
  assert (spec.released.family, spec.released.image_size, spec.preprocess.size) == (
      "siglip", 16, 16)
  assert (spec.preprocess.method, spec.tokenizer.pad_token, spec.tokenizer.max_len) == (
      "tf_bilinear", "</s>", 10)
  tok = released.make_tokenizer(spec)
  assert tok.pad_id == tok.eos_id == 1
  loaded = released.load_params(spec)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
