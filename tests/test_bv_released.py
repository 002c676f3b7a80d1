"""Released big_vision SigLIP / SigLIP 2 layouts: key sets, per-tower heads, scanned blocks.

The key lists below are written out from what the public conversion code
(transformers' convert_siglip_to_hf.py / convert_siglip2_to_hf.py) reads from the released
`.npz` files, independently of models/big_vision.py. Embeddings are checked against the
numpy big_vision forward pass of test_big_vision.py.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siglip_fair.models import make_model
from siglip_fair.models import big_vision as bv
from test_big_vision import IMAGES, TOKENS, big_vision_forward, bv_checkpoint

_ATTN = [f"MultiHeadDotProductAttention_0/{p}/{w}" for p in ("query", "key", "value", "out")
         for w in ("kernel", "bias")]
_MLP = [f"MlpBlock_0/Dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias")]
_LN = lambda name: [f"{name}/scale", f"{name}/bias"]  # noqa: E731
_BLOCK = _LN("LayerNorm_0") + _LN("LayerNorm_1") + _ATTN + _MLP


def released_keys(img_depth, txt_depth, scan):
  """The keys of a released SigLIP (scan=False) / SigLIP 2 (scan=True) file: MAP-pooled image
  tower without head, text tower with `head`, learnt t and b, everything under params/."""
  def blocks(stack, depth):
    if scan:
      return [f"{stack}/encoderblock/{k}" for k in _BLOCK]
    return [f"{stack}/encoderblock_{i}/{k}" for i in range(depth) for k in _BLOCK]
  img = (["embedding/kernel", "embedding/bias", "pos_embedding", "MAPHead_0/probe"]
         + [f"MAPHead_0/{k}" for k in _ATTN + _LN("LayerNorm_0") + _MLP]
         + blocks("Transformer", img_depth) + _LN("Transformer/encoder_norm"))
  txt = (["Embed_0/embedding", "pos_embedding", "head/kernel", "head/bias"]
         + blocks("Encoder_0", txt_depth) + _LN("Encoder_0/encoder_norm"))
  return ({f"params/img/{k}" for k in img} | {f"params/txt/{k}" for k in txt}
          | {"params/t", "params/b"})


def released_config(scan=False, padding="none"):
  """A tiny model in released SigLIP's structure (widths 16 / 12, depths 2 / 3)."""
  return ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4", width=16, depth=2, mlp_dim=24, num_heads=2, pool="map",
                 head="none", scan=scan),
      text=dict(variant="mu", width=12, depth=3, mlp_dim=20, num_heads=3, vocab_size=13,
                max_len=6, pool="last", padding=padding, head="linear", scan=scan),
      embed_dim=16, head="linear", t_init=10.0, b_init=-10.0))


def _init(model, images=IMAGES):
  return jax.tree.map(np.asarray, model.init(jax.random.key(0), images, TOKENS)["params"])


@pytest.mark.parametrize("scan", [False, True])
def test_export_has_the_released_key_set(scan):
  flat = bv.to_big_vision(_init(make_model(released_config(scan))), scan=scan)
  assert set(flat) == released_keys(2, 3, scan)
  assert not any(k.startswith(("params/img/head/", "params/img/cls", "params/txt/MAPHead_0"))
                 for k in flat)
  assert flat["params/txt/head/kernel"].shape == (12, 16)  # text width -> image width
  assert flat["params/img/pos_embedding"].shape == (1, 4, 16)
  assert flat["params/txt/Embed_0/embedding"].shape == (13, 12)
  assert flat["params/t"].shape == flat["params/b"].shape == (1,)
  ln = "Transformer/encoderblock/LayerNorm_0/scale" if scan else \
      "Transformer/encoderblock_1/LayerNorm_0/scale"
  assert flat[f"params/img/{ln}"].shape == ((2, 16) if scan else (16,))
  q = "Encoder_0/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
  if scan:  # stacked [depth, D, heads, D/heads], as nn.scan(variable_axes={'params': 0})
    assert flat[f"params/txt/{q}"].shape == (3, 12, 3, 4)
  # The other layout of the same model is the same numbers, stacked or split.
  other = bv.to_big_vision(bv.from_big_vision(flat, scan=not scan), scan=not scan)
  assert set(other) == released_keys(2, 3, not scan)


@pytest.mark.parametrize("scan,prefix", [(False, "params/"), (True, "params/"),
                                         ((True, False), ""), ((False, True), "params/")])
def test_released_layout_matches_numpy_big_vision(tmp_path, scan, prefix):
  flat = bv_checkpoint(img_pool="map", txt_pool="last", bias=True, scan=scan, embed_dim=16,
                       img_head=False, prefix=prefix)
  if prefix and scan in (False, True):
    assert set(flat) == released_keys(2, 3, scan)
  np.savez(tmp_path / "bv.npz", **flat)
  loaded = bv.load_npz(tmp_path / "bv.npz")
  cfg = bv.model_config(loaded, scan=None)  # our model in the file's own block layout
  scans = (scan, scan) if isinstance(scan, bool) else scan
  assert (cfg["image"]["scan"], cfg["text"]["scan"]) == scans
  assert (cfg["image"]["head"], cfg["text"]["head"], cfg["embed_dim"]) == ("none", "linear", 16)
  assert (cfg["image"]["pool"], cfg["text"]["pool"], cfg["text"]["padding"]) == (
      "map", "last", "none")
  params = bv.from_big_vision(loaded, scan=None, image_size=8)
  bv.check_params(ml_collections.ConfigDict(cfg), params, 8)
  model = make_model(ml_collections.ConfigDict(cfg))
  zimg, ztxt, extras = jax.jit(model.apply)({"params": params}, IMAGES, TOKENS)
  want_img, want_txt, _ = big_vision_forward(flat, prefix, IMAGES, TOKENS, "map", "last")
  np.testing.assert_allclose(zimg, want_img, atol=1e-4)
  np.testing.assert_allclose(ztxt, want_txt, atol=1e-4)
  np.testing.assert_allclose(extras["t"], np.exp(flat[prefix + "t"][0]), rtol=1e-6)
  np.testing.assert_allclose(extras["b"], flat[prefix + "b"][0], atol=1e-6)
  # Export back in the file's layout: the very same arrays under the very same keys.
  original = {"params/" + k[len(prefix):]: v for k, v in flat.items()}
  for layout_params, write_scan in ((params, None),
                                    (bv.from_big_vision(loaded, scan=False), scan)):
    back = bv.load_npz(bv.save_npz(tmp_path / "ours.npz", layout_params, scan=write_scan))
    assert set(back) == set(original)
    for key, value in original.items():
      assert back[key].dtype == value.dtype, key
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def _stack_blocks(tree, stack, depth):
  """Per-layer `encoderblock_<i>` subtrees -> one `encoderblock` tree with a [depth] axis."""
  tree = dict(tree)
  tree[stack] = dict(tree[stack])
  layers = [tree[stack].pop(f"encoderblock_{i}") for i in range(depth)]
  tree[stack]["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return tree


def test_scanned_model_equals_per_layer_model_and_gradients():
  # Token masking on: the mask is broadcast into the scanned blocks as well.
  tokens = np.where(TOKENS == 1, 0, TOKENS)
  layered, scanned = (make_model(released_config(s, padding="mask")) for s in (False, True))
  params = _init(layered)
  stacked = dict(params, img=_stack_blocks(params["img"], "Transformer", 2),
                 txt=_stack_blocks(params["txt"], "Encoder_0", 3))
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(
      np.shape, jax.eval_shape(scanned.init, jax.random.key(0), IMAGES, tokens)["params"])

  def loss(p, model):
    zimg, ztxt, extras = model.apply({"params": p}, IMAGES, tokens)
    logits = extras["t"] * zimg @ ztxt.T + extras["b"]
    # SigLIP's loss, normalised by the batch size as in big_vision.
    return -jnp.sum(jax.nn.log_sigmoid((2 * jnp.eye(3) - 1) * logits)) / 3, (zimg, ztxt)

  (l1, z1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, layered), has_aux=True))(params)
  (l2, z2), g2 = jax.jit(jax.value_and_grad(lambda p: loss(p, scanned), has_aux=True))(stacked)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(z1, z2):
    np.testing.assert_allclose(a, b, atol=1e-5)
  g1 = dict(g1, img=_stack_blocks(g1["img"], "Transformer", 2),
            txt=_stack_blocks(g1["txt"], "Encoder_0", 3))
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1)) > 1e-3  # not all zero
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


# ---- released sizes, as shapes only (zero-cost broadcast arrays) ----

def _released_shapes(img, patch, grid, txt, vocab, max_len, scan):
  """{key: shape} of a released two-tower file: (width, depth, mlp, heads) per tower."""
  shapes = {}
  for tower, stack, (d, depth, mlp, heads) in (("img", "Transformer", img),
                                               ("txt", "Encoder_0", txt)):
    block = {"LayerNorm_0/scale": (d,), "LayerNorm_0/bias": (d,), "LayerNorm_1/scale": (d,),
             "LayerNorm_1/bias": (d,), "MlpBlock_0/Dense_0/kernel": (d, mlp),
             "MlpBlock_0/Dense_0/bias": (mlp,), "MlpBlock_0/Dense_1/kernel": (mlp, d),
             "MlpBlock_0/Dense_1/bias": (d,)}
    for p in ("query", "key", "value"):
      block[f"MultiHeadDotProductAttention_0/{p}/kernel"] = (d, heads, d // heads)
      block[f"MultiHeadDotProductAttention_0/{p}/bias"] = (heads, d // heads)
    block["MultiHeadDotProductAttention_0/out/kernel"] = (heads, d // heads, d)
    block["MultiHeadDotProductAttention_0/out/bias"] = (d,)
    for k, s in block.items():
      if scan:
        shapes[f"{tower}/{stack}/encoderblock/{k}"] = (depth, *s)
      else:
        shapes.update({f"{tower}/{stack}/encoderblock_{i}/{k}": s for i in range(depth)})
    shapes.update({f"{tower}/{stack}/encoder_norm/scale": (d,),
                   f"{tower}/{stack}/encoder_norm/bias": (d,)})
    if tower == "img":
      shapes.update({f"img/MAPHead_0/{k}": s for k, s in block.items()
                     if not k.startswith("LayerNorm_1")})
      shapes["img/MAPHead_0/probe"] = (1, 1, d)
  d_img, d_txt = img[0], txt[0]
  shapes.update({"img/embedding/kernel": (patch, patch, 3, d_img), "img/embedding/bias": (d_img,),
                 "img/pos_embedding": (1, grid * grid, d_img),
                 "txt/Embed_0/embedding": (vocab, d_txt), "txt/pos_embedding": (1, max_len, d_txt),
                 "txt/head/kernel": (d_txt, d_img), "txt/head/bias": (d_img,), "t": (1,),
                 "b": (1,)})
  return {f"params/{k}": np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


B, L, SO400M = (768, 12, 3072, 12), (1024, 24, 4096, 16), (1152, 27, 4304, 16)


@pytest.mark.parametrize("name,img,patch,grid,txt,vocab,max_len,scan,variant", [
    ("SigLIP B/16 224", B, 16, 14, B, 32_000, 64, False, "B/16"),
    ("SigLIP L/16 256", L, 16, 16, L, 32_000, 64, False, "L/16"),
    ("SigLIP So400m/14 384", SO400M, 14, 27, SO400M, 32_000, 64, False, "So400m/14"),
    ("SigLIP i18n B/16 256", B, 16, 16, B, 250_000, 64, False, "B/16"),
    ("SigLIP 2 B/16 512", B, 16, 32, B, 256_000, 64, True, "B/16"),
])
def test_released_sizes_are_read_from_the_keys(name, img, patch, grid, txt, vocab, max_len,
                                               scan, variant):
  flat = _released_shapes(img, patch, grid, txt, vocab, max_len, scan)
  cfg = bv.model_config(flat, scan=None)
  assert cfg["image"]["variant"] == variant, name
  assert (cfg["image"]["width"], cfg["image"]["depth"], cfg["image"]["mlp_dim"],
          cfg["image"]["num_heads"]) == img
  assert (cfg["text"]["width"], cfg["text"]["depth"]) == txt[:2]
  assert (cfg["text"]["vocab_size"], cfg["text"]["max_len"]) == (vocab, max_len)
  assert (cfg["image"]["head"], cfg["text"]["head"], cfg["embed_dim"]) == ("none", "linear",
                                                                           img[0])
  assert cfg["image"]["scan"] is scan and cfg["text"]["scan"] is scan
  bv.check_tokenizer(flat, vocab, max_len)
  with pytest.raises(ValueError, match=f"{vocab + 1} pieces.*only {vocab} rows"):
    bv.check_tokenizer(flat, vocab + 1)
  if scan:  # one traced block per tower: cheap even at this size
    params = jax.tree.map(np.shape, bv.from_big_vision(flat, scan=True))
    assert params["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"] == (12, 768)
