"""big_vision interop: npz round trip, an independent numpy forward pass of big_vision's
two-tower model, error cases, and big_vision-style tokenization."""
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from siglip_fair.data import tokenizer as tok_lib
from siglip_fair.models import TextTransformer, make_model
from siglip_fair.models import big_vision as bv

IMAGES = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
# No masking in big_vision: zeros and EOS (1) padding are ordinary positions.
TOKENS = np.array([[5, 6, 1, 1, 1, 1], [7, 8, 9, 10, 11, 1], [3, 1, 0, 0, 0, 0]], np.int32)


def _shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0), IMAGES, TOKENS)["params"]


def _random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _our_config(img_pool, txt_pool, b_init, head):
  return ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4", pool=img_pool),
      text=dict(variant="mu", vocab_size=13, max_len=6, pool=txt_pool),
      embed_dim=32 if head == "none" else 12, head=head, t_init=10.0, b_init=b_init))


@pytest.mark.parametrize("img_pool,txt_pool,b_init,head", [
    ("map", "map", -10.0, "linear"), ("map", "last", None, "linear"), ("tok", "gap", 0.5, "none")])
def test_round_trip_is_bit_exact(tmp_path, img_pool, txt_pool, b_init, head):
  shapes = _shapes(make_model(_our_config(img_pool, txt_pool, b_init, head)))
  ours = _random_like(shapes)
  flat = bv.to_big_vision(ours)
  assert all(k.startswith("params/") for k in flat) and flat["params/t"].shape == (1,)
  assert ("params/b" in flat) == (b_init is not None)
  assert ("params/img/head/kernel" in flat) == (head == "linear")
  assert flat["params/txt/Embed_0/embedding"].shape == (13, 32)
  path = bv.save_npz(tmp_path / "ckpt.npz", ours)
  assert os.listdir(tmp_path) == ["ckpt.npz"]
  loaded = bv.load_npz(path)
  back = bv.from_big_vision(loaded)
  assert jax.tree.structure(back) == jax.tree.structure(ours)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ours)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  # The inferred config builds exactly this tree (the text tower keeps its masking here).
  cfg = bv.model_config(loaded, text_pool=txt_pool, text_padding="mask")
  assert cfg["image"]["pool"] == img_pool and cfg["head"] == head
  assert cfg["b_init"] == pytest.approx(None if b_init is None else float(ours["b"]))
  rebuilt = _shapes(make_model(ml_collections.ConfigDict(cfg)))
  assert jax.tree.map(lambda s: s.shape, rebuilt) == jax.tree.map(np.shape, ours)


# ---- a checkpoint written directly in big_vision's layout, and big_vision's forward pass ----

def _block(rng, d, mlp, heads):
  p = {}
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    p[f"{ln}/scale"], p[f"{ln}/bias"] = 1 + 0.1 * rng.normal(size=d), 0.1 * rng.normal(size=d)
  p.update(_attention(rng, d, heads))
  p.update(_mlp(rng, d, mlp))
  return p


def _attention(rng, d, heads, name="MultiHeadDotProductAttention_0"):
  p = {}
  for n in ("query", "key", "value"):
    p[f"{name}/{n}/kernel"] = rng.normal(size=(d, heads, d // heads)) * d ** -0.5
    p[f"{name}/{n}/bias"] = 0.1 * rng.normal(size=(heads, d // heads))
  p[f"{name}/out/kernel"] = rng.normal(size=(heads, d // heads, d)) * d ** -0.5
  p[f"{name}/out/bias"] = 0.1 * rng.normal(size=d)
  return p


def _mlp(rng, d, mlp):
  return {"MlpBlock_0/Dense_0/kernel": rng.normal(size=(d, mlp)) * d ** -0.5,
          "MlpBlock_0/Dense_0/bias": 0.1 * rng.normal(size=mlp),
          "MlpBlock_0/Dense_1/kernel": rng.normal(size=(mlp, d)) * mlp ** -0.5,
          "MlpBlock_0/Dense_1/bias": 0.1 * rng.normal(size=d)}


def _tower(rng, tower, stack, d, depth, mlp, heads, pool, embed_dim, scan):
  p = {}
  blocks = [_block(rng, d, mlp, heads) for _ in range(depth)]
  if scan:
    p.update({f"{stack}/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
  else:
    p.update({f"{stack}/encoderblock_{i}/{k}": v
              for i, b in enumerate(blocks) for k, v in b.items()})
  p[f"{stack}/encoder_norm/scale"] = 1 + 0.1 * rng.normal(size=d)
  p[f"{stack}/encoder_norm/bias"] = 0.1 * rng.normal(size=d)
  if pool == "map":
    p["MAPHead_0/probe"] = rng.normal(size=(1, 1, d))
    p.update({f"MAPHead_0/{k}": v for k, v in _attention(rng, d, heads).items()})
    p["MAPHead_0/LayerNorm_0/scale"] = 1 + 0.1 * rng.normal(size=d)
    p["MAPHead_0/LayerNorm_0/bias"] = 0.1 * rng.normal(size=d)
    p.update({f"MAPHead_0/{k}": v for k, v in _mlp(rng, d, mlp).items()})
  if pool == "tok":
    p["cls"] = rng.normal(size=(1, 1, d))
  if embed_dim:
    p["head/kernel"] = rng.normal(size=(d, embed_dim)) * d ** -0.5
    p["head/bias"] = 0.1 * rng.normal(size=embed_dim)
  return {f"{tower}/{k}": v for k, v in p.items()}


def bv_checkpoint(*, img_pool, txt_pool, bias, scan, embed_dim, prefix, txt_width=12, seed=0,
                  img_head=True, grid=2):
  """Random big_vision two-tower params: ViT p=4 width 16 (2 heads) on a grid x grid patch
  grid, text width `txt_width`. `scan`: bool or (image, text); `embed_dim` 0: no heads;
  img_head=False: only `txt/head` (released SigLIP's out_dim=(None, 16), needs embed_dim=16)."""
  img_scan, txt_scan = (scan, scan) if isinstance(scan, bool) else scan
  rng = np.random.default_rng(seed)
  flat = _tower(rng, "img", "Transformer", 16, 2, 24, 2, img_pool,
                embed_dim if img_head else 0, img_scan)
  flat["img/embedding/kernel"] = rng.normal(size=(4, 4, 3, 16)) * 48 ** -0.5
  flat["img/embedding/bias"] = 0.1 * rng.normal(size=16)
  flat["img/pos_embedding"] = rng.normal(size=(1, grid * grid, 16)) * 0.25
  flat.update(_tower(rng, "txt", "Encoder_0", txt_width, 3, 20, txt_width // 4, txt_pool,
                     embed_dim, txt_scan))
  flat["txt/Embed_0/embedding"] = rng.normal(size=(13, txt_width))
  flat["txt/pos_embedding"] = rng.normal(size=(1, 6, txt_width)) * 0.25
  flat["t"] = np.array([np.log(10.0)]) + rng.normal(size=1)
  if bias:
    flat["b"] = -10.0 + rng.normal(size=1)
  return {prefix + k: v.astype(np.float32) for k, v in flat.items()}


def _ln(x, g):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * g("scale") + g("bias")


def _gelu(x):  # flax nn.gelu's default: the tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _sub(g, name):
  return lambda k: g(f"{name}/{k}")


def _mha(xq, xkv, g):
  q, k, v = (np.einsum("bld,dhk->blhk", x, g(f"{n}/kernel")) + g(f"{n}/bias")
             for n, x in (("query", xq), ("key", xkv), ("value", xkv)))
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", o, g("out/kernel")) + g("out/bias")


def _mlp_fwd(x, g):
  h = _gelu(x @ g("Dense_0/kernel") + g("Dense_0/bias"))
  return h @ g("Dense_1/kernel") + g("Dense_1/bias")


def _encoder(x, g, has):
  scan = has("encoderblock/LayerNorm_0/scale")
  depth = g("encoderblock/LayerNorm_0/scale").shape[0] if scan else sum(
      has(f"encoderblock_{i}/LayerNorm_0/scale") for i in range(100))
  for i in range(depth):
    b = (lambda k, i=i: g(f"encoderblock/{k}")[i]) if scan else _sub(g, f"encoderblock_{i}")
    y = _ln(x, _sub(b, "LayerNorm_0"))
    x = x + _mha(y, y, _sub(b, "MultiHeadDotProductAttention_0"))
    x = x + _mlp_fwd(_ln(x, _sub(b, "LayerNorm_1")), _sub(b, "MlpBlock_0"))
  return _ln(x, _sub(g, "encoder_norm"))


def _pool_project(x, g, has, pool):
  if pool == "map":
    m = _sub(g, "MAPHead_0")
    probe = np.broadcast_to(m("probe"), (x.shape[0], 1, x.shape[-1]))
    y = _mha(probe, x, _sub(m, "MultiHeadDotProductAttention_0"))
    x = (y + _mlp_fwd(_ln(y, _sub(m, "LayerNorm_0")), _sub(m, "MlpBlock_0")))[:, 0]
  else:
    x = {"tok": x[:, 0], "first": x[:, 0], "last": x[:, -1], "gap": x.mean(1)}[pool]
  if has("head/kernel"):
    x = x @ g("head/kernel") + g("head/bias")
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def big_vision_forward(flat, prefix, images, tokens, img_pool, txt_pool):
  """(zimg, ztxt, logits) of big_vision's two-tower model, read from the flat keys."""
  def getter(tower):
    return (lambda k: flat[f"{prefix}{tower}/{k}"].astype(np.float64),
            lambda k: f"{prefix}{tower}/{k}" in flat)
  g, has = getter("img")
  kernel = g("embedding/kernel")
  p, (n, h, w, c) = kernel.shape[0], images.shape
  patches = images.astype(np.float64).reshape(n, h // p, p, w // p, p, c).transpose(
      0, 1, 3, 2, 4, 5).reshape(n, -1, p, p, c)
  x = np.einsum("bnijc,ijcd->bnd", patches, kernel) + g("embedding/bias") + g("pos_embedding")
  if img_pool == "tok":
    x = np.concatenate([np.broadcast_to(g("cls"), (n, 1, x.shape[-1])), x], axis=1)
  zimg = _pool_project(_encoder(x, _sub(g, "Transformer"), lambda k: has(f"Transformer/{k}")),
                       g, has, img_pool)
  g, has = getter("txt")
  x = g("Embed_0/embedding")[tokens] + g("pos_embedding")
  ztxt = _pool_project(_encoder(x, _sub(g, "Encoder_0"), lambda k: has(f"Encoder_0/{k}")),
                       g, has, txt_pool)
  b = flat[prefix + "b"][0] if prefix + "b" in flat else 0.0
  return zimg, ztxt, np.exp(flat[prefix + "t"][0]) * zimg @ ztxt.T + b


@pytest.mark.parametrize("case", [
    dict(img_pool="map", txt_pool="map", bias=True, scan=False, embed_dim=10, prefix="params/"),
    dict(img_pool="tok", txt_pool="last", bias=False, scan=True, embed_dim=10, prefix=""),
    dict(img_pool="gap", txt_pool="gap", bias=True, scan=True, embed_dim=0, prefix="params/",
         txt_width=16),
    dict(img_pool="tok", txt_pool="first", bias=False, scan=False, embed_dim=0, prefix="",
         txt_width=16),
])
def test_loaded_checkpoint_matches_numpy_big_vision(tmp_path, case):
  flat = bv_checkpoint(**case)
  np.savez(tmp_path / "bv.npz", **flat)  # big_vision writes plain np.savez archives
  loaded = bv.load_npz(tmp_path / "bv.npz")
  img_pool, txt_pool = case["img_pool"], case["txt_pool"]
  cfg = bv.model_config(loaded, image_pool="gap" if img_pool == "gap" else None,
                        text_pool=txt_pool)
  assert (cfg["image"]["depth"], cfg["image"]["num_heads"], cfg["image"]["mlp_dim"]) == (2, 2, 24)
  assert (cfg["text"]["depth"], cfg["text"]["max_len"], cfg["text"]["vocab_size"]) == (3, 6, 13)
  assert cfg["image"]["variant"] == "mu/4" and cfg["image"]["pool"] == img_pool
  assert cfg["head"] == ("linear" if case["embed_dim"] else "none")
  assert (cfg["b_init"] is None) == (not case["bias"])
  model = make_model(ml_collections.ConfigDict(cfg))
  params = bv.from_big_vision(loaded)
  assert jax.tree.map(lambda s: s.shape, _shapes(model)) == jax.tree.map(np.shape, params)
  zimg, ztxt, extras = jax.jit(model.apply)({"params": params}, IMAGES, TOKENS)
  want_img, want_txt, want_logits = big_vision_forward(flat, case["prefix"], IMAGES, TOKENS,
                                                       img_pool, txt_pool)
  np.testing.assert_allclose(zimg, want_img, atol=1e-5)
  np.testing.assert_allclose(ztxt, want_txt, atol=1e-5)
  logits = extras["t"] * np.asarray(zimg) @ np.asarray(ztxt).T + extras["b"]
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-4)


# ---- errors ----

def test_pickled_and_unreadable_npz_are_rejected(tmp_path):
  np.savez(tmp_path / "p.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match="pickle"):
    bv.load_npz(tmp_path / "p.npz")
  (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError):
    bv.load_npz(tmp_path / "junk.npz")


def _ckpt(**kw):
  return bv_checkpoint(**{**dict(img_pool="map", txt_pool="last", bias=True, scan=False,
                                 embed_dim=10, prefix="params/"), **kw})


@pytest.mark.parametrize("drop", ["params/txt/Encoder_0/encoderblock_1/LayerNorm_1/bias",
                                  "params/t", "params/img/head/bias",
                                  "params/img/MAPHead_0/MlpBlock_0/Dense_1/kernel"])
def test_missing_key_is_named(drop):
  flat = _ckpt()
  del flat[drop]
  with pytest.raises(ValueError, match="missing keys.*" + re.escape(drop[len("params/"):])):
    bv.from_big_vision(flat)


def test_unknown_keys_and_mixed_layouts_are_rejected():
  flat = _ckpt()
  flat["params/img/pre_logits/kernel"] = np.zeros((16, 16), np.float32)
  with pytest.raises(ValueError, match="unknown keys.*img/pre_logits/kernel"):
    bv.from_big_vision(flat)
  mixed = {**_ckpt(), **{k: v for k, v in _ckpt(scan=True).items() if "encoderblock/" in k}}
  with pytest.raises(ValueError, match="one layout"):
    bv.from_big_vision(mixed)
  # Optimizer state beside `params/` (train checkpoints) is ignored.
  train = {**_ckpt(), "opt/mu/img/cls": np.zeros(3, np.float32)}
  assert jax.tree.structure(bv.from_big_vision(train)) == jax.tree.structure(
      bv.from_big_vision(_ckpt()))


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="need 'map'"):
    bv.model_config(_ckpt(), image_pool="gap")
  with pytest.raises(ValueError, match="pool='map'"):
    bv.model_config(_ckpt(), text_pool="map")
  with pytest.raises(ValueError, match="patch=16"):
    bv.model_config(_ckpt(), patch=16)
  with pytest.raises(ValueError, match="different tower widths"):
    bv.model_config(_ckpt(embed_dim=0))
  mlp = _random_like(_shapes(make_model(_our_config("map", "last", -10.0, "mlp"))))
  with pytest.raises(ValueError, match="head='mlp'"):
    bv.to_big_vision(mlp)
  with pytest.raises(ValueError, match="padding"):
    jax.eval_shape(TextTransformer(13, 6, 8, 1, 16, 2, padding="eos").init,
                   jax.random.key(0), TOKENS)


# ---- tokenizer: big_vision's eos / pad_value options ----

_CORPUS = [f"a photo of a {a} with a {b}." for a in ("man", "woman", "nurse", "doctor")
           for b in ("book", "laptop", "broom", "red hat", "blue bag")]


def test_tokenizer_eos_modes_match_sentencepiece(tmp_path):
  path = tok_lib.train_sentencepiece(iter(_CORPUS), 60, str(tmp_path / "t.model"))
  raw = spm.SentencePieceProcessor(model_file=path)
  max_len = 6
  texts = ["a man", "a photo of a woman with a red hat.", "", "a nurse with a book"]
  assert len(raw.encode(texts[1])) > max_len
  expect = {"none": lambda ids: ids[:max_len], "yes": lambda ids: (ids + [1])[:max_len],
            "sticky": lambda ids: ids[:max_len - 1] + [1]}
  for eos, fn in expect.items():
    for pad in (0, 1):
      got = tok_lib.Tokenizer(path, max_len, eos=eos, pad_id=pad).encode(texts)
      for row, text in zip(got, texts):
        ids = fn(raw.encode(text))
        np.testing.assert_array_equal(row, ids + [pad] * (max_len - len(ids)), err_msg=eos)
  default = tok_lib.Tokenizer(path, max_len)
  np.testing.assert_array_equal(default.encode(texts),
                                tok_lib.Tokenizer(path, max_len, eos="sticky").encode(texts))
  siglip = tok_lib.Tokenizer(path, 32, eos="sticky", pad_id=1)
  assert siglip.decode(siglip.encode(["a man with a book."])) == ["a man with a book."]
  with pytest.raises(ValueError, match="eos="):
    tok_lib.Tokenizer(path, max_len, eos="always")
  with pytest.raises(ValueError, match="pad_id"):
    tok_lib.Tokenizer(path, max_len, pad_id=2)
