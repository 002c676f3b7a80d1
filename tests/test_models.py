"""Model tests: variant table, position embeddings, padding masks, pooling, two-tower outputs."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siglip_fair.models import (TextTransformer, ViT, decode_variant, embed_fns, make_model,
                                temperature)
from siglip_fair.models.vit import posemb_sincos_2d

# big_vision's table (width, depth, mlp_dim, heads), written out independently of the code.
BIG_VISION = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
              "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
              "So400m": (1152, 27, 4304, 16), "mu": (32, 1, 128, 2)}


def _config(**model):
  cfg = dict(image=dict(variant="mu/4", pool="gap"),
             text=dict(variant="mu", vocab_size=11, max_len=6, pool="last"),
             embed_dim=12, t_init=10.0, b_init=-10.0)
  cfg.update(model)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def tiny():
  model = make_model(_config())
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  tokens = np.array([[3, 4, 5, 0, 0, 0], [7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]], np.int32)
  params, [outputs] = _init_and_apply(model, (images, tokens))
  return model, params, images, tokens, outputs


def _init_and_apply(module, *inputs):
  """Initialises `module` on inputs[0] and applies it to every input tuple, in one program
  (compilation dominates these tests)."""
  return _init_and_apply_all({None: (module, inputs)})[None]


def _init_and_apply_all(cases: dict) -> dict:
  """{name: (module, input tuples)} -> {name: (params, outputs)}, all in one compiled program."""
  @jax.jit
  def run(key):
    out = {}
    for name, (module, inputs) in cases.items():
      params = module.init(key, *inputs[0])["params"]
      out[name] = params, [module.apply({"params": params}, *x) for x in inputs]
    return out
  return run(jax.random.key(0))


TEXT_SHORT = np.array([[3, 4, 5], [7, 2, 0]], np.int32)
TEXT_PADDED = np.pad(TEXT_SHORT, ((0, 0), (0, 5)))
VIT_CASES = [("gap", "learn"), ("map", "sincos2d"), ("tok", "learn")]
VIT_IMAGES = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)


def _vit(pool, posemb):
  return ViT(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2, pool=pool,
             posemb=posemb)


@pytest.fixture(scope="module")
def text_towers():
  return _init_and_apply_all({
      pool: (TextTransformer(vocab_size=11, max_len=8, width=16, depth=2, mlp_dim=32,
                             num_heads=2, pool=pool), [(TEXT_PADDED,), (TEXT_SHORT,)])
      for pool in ("last", "first", "gap", "map")})


@pytest.fixture(scope="module")
def vits():
  return _init_and_apply_all({case: (_vit(*case), [(VIT_IMAGES,)]) for case in VIT_CASES})



@pytest.mark.parametrize("name", sorted(BIG_VISION))
def test_variants_follow_big_vision(name):
  got = decode_variant(f"{name}/14")
  assert (got["width"], got["depth"], got["mlp_dim"], got["num_heads"]) == BIG_VISION[name]
  assert got["patch_size"] == (14, 14)
  assert "patch_size" not in decode_variant(name)


def test_variant_overrides_and_errors():
  got = decode_variant("mu/4", overrides=dict(width=48, depth=None, num_heads=4))
  assert (got["width"], got["depth"], got["num_heads"]) == (48, 1, 4)
  for bad in ("XL/16", "B/16/2", "B/x", ""):
    with pytest.raises(ValueError, match="variant"):
      decode_variant(bad)
  with pytest.raises(ValueError, match="patch"):
    decode_variant("B", need_patch=True)
  with pytest.raises(ValueError, match="divisible"):
    decode_variant("mu", overrides=dict(width=33))
  with pytest.raises(ValueError, match="override"):
    decode_variant("mu", overrides=dict(widht=32))


def test_sincos2d_matches_formula():
  h, w, d = 3, 4, 8
  pe = posemb_sincos_2d(h, w, d)[0]
  q = d // 4
  for row in range(h):
    for col in range(w):
      for k in range(q):
        omega = 10_000.0 ** (-k / (q - 1))
        want = [math.sin(col * omega), math.cos(col * omega),
                math.sin(row * omega), math.cos(row * omega)]
        np.testing.assert_allclose(pe[row * w + col, k::q], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["last", "first", "gap", "map"])
def test_text_padding_is_invisible(pool, text_towers):
  """Extra trailing padding changes nothing: padded keys are masked and never pooled."""
  _, [(out_padded, tokens), (out_short, _)] = text_towers[pool]
  np.testing.assert_allclose(out_padded, out_short, rtol=1e-5, atol=1e-6)
  if pool == "last":  # the last non-padding token: positions 2 and 1
    np.testing.assert_allclose(out_padded, tokens[[0, 1], [2, 1]], rtol=1e-6)
  if pool == "gap":
    np.testing.assert_allclose(out_padded[1], tokens[1, :2].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool,posemb", VIT_CASES)
def test_vit_pooling_and_shapes(pool, posemb, vits):
  params, [(pooled, tokens)] = vits[(pool, posemb)]
  assert pooled.shape == (2, 16)
  assert tokens.shape == (2, 6 + (pool == "tok"), 16)
  assert ("pos_embedding" in params) == (posemb == "learn")
  if pool == "gap":
    np.testing.assert_allclose(pooled, tokens.mean(1), rtol=1e-5, atol=1e-6)
  if pool == "tok":
    np.testing.assert_allclose(pooled, tokens[:, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="multiples of the patch"):
    jax.eval_shape(_vit(pool, posemb).init, jax.random.key(0), VIT_IMAGES[:, :7])


def test_two_tower_outputs(tiny):
  model, params, images, tokens, (zimg, ztxt, extras) = tiny
  assert zimg.shape == ztxt.shape == (3, 12) and zimg.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(extras["t"], 10.0, rtol=1e-6)
  np.testing.assert_allclose(extras["b"], -10.0)
  assert extras["img/pre_logits"].shape == (3, 32)
  # One tower at a time gives the same embeddings (and the jitted evaluator helpers agree).
  embed_images, embed_texts = embed_fns(model)  # image-only and text-only calls
  np.testing.assert_allclose(embed_images(params, images), zimg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(embed_texts(params, tokens), ztxt, rtol=1e-5, atol=1e-6)
  assert temperature(params) == pytest.approx(float(extras["t"]), rel=1e-6)
  with pytest.raises(ValueError, match="no 't'"):
    temperature({"img": {}})


def test_embedding_on_a_mesh_matches_one_device(tiny):
  from siglip_fair.train.sharding import make_mesh, state_shardings
  model, params, images, tokens, (zimg, ztxt, _) = tiny  # 3 rows: not a multiple of 8
  mesh = make_mesh({"data": 2, "fsdp": 4})
  sharded = jax.device_put(params, state_shardings(params, mesh))  # FSDP-split parameters
  embed_images, embed_texts = embed_fns(model, mesh)
  got = embed_images(sharded, images)
  assert got.shape == zimg.shape and len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, zimg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(embed_texts(sharded, tokens), ztxt, rtol=1e-5, atol=1e-6)


def test_clip_style_has_no_bias_parameter():
  model = make_model(_config(t_init=1 / 0.07, b_init=None))
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3)),
                          np.ones((1, 6), np.int32))["params"]
  assert "t" in shapes and "b" not in shapes
  _, [(_, _, extras)] = _init_and_apply(model, ())  # no inputs: only the scalars
  np.testing.assert_allclose(extras["t"], 1 / 0.07, rtol=1e-5)
  assert float(extras["b"]) == 0.0


def test_overrides_and_bfloat16_compute(tiny):
  model, params, images, tokens, (zimg, ztxt, _) = tiny
  cfg = _config(dtype="bfloat16")
  cfg.image.width = 32  # same sizes as `tiny`, so its fp32 params fit
  bf16 = make_model(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(bf16.init, jax.random.key(0), images, tokens)["params"]))
  zimg16, ztxt16, _ = jax.jit(bf16.apply)({"params": params}, images, tokens)
  assert zimg16.dtype == jnp.float32
  np.testing.assert_allclose(zimg16, zimg, atol=5e-2)
  np.testing.assert_allclose(ztxt16, ztxt, atol=5e-2)
  wide = make_model(_config(image=dict(variant="mu/4", width=48, num_heads=3)))
  p = jax.eval_shape(wide.init, jax.random.key(0), images, tokens)["params"]
  assert p["img"]["embedding"]["kernel"].shape == (4, 4, 3, 48)


def test_bad_model_config_raises():
  with pytest.raises(ValueError, match="vocab_size"):
    make_model(_config(text=dict(variant="mu")))
  with pytest.raises(ValueError, match="dtype"):
    make_model(_config(dtype="float16"))
  with pytest.raises(ValueError, match="t_init"):
    make_model(_config(t_init=0.0))
  model = make_model(_config(text=dict(variant="mu", vocab_size=11, max_len=6, pool="cls")))
  with pytest.raises(ValueError, match="pool"):
    jax.eval_shape(model.init, jax.random.key(0), None, np.ones((1, 6), np.int32))
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(make_model(_config()).init, jax.random.key(0), None,
                   np.ones((1, 7), np.int32))


def test_projection_heads():
  images, tokens = np.zeros((2, 8, 8, 3), np.float32), np.ones((2, 6), np.int32)
  params = {h: jax.eval_shape(make_model(_config(head=h, embed_dim=32)).init, jax.random.key(0),
                              images, tokens)["params"] for h in ("linear", "mlp", "none")}
  assert params["linear"]["img_head"]["kernel"].shape == (32, 32)
  assert params["mlp"]["img_head_hidden"]["kernel"].shape == (32, 32)
  assert "img_head" not in params["none"] and "txt_head" not in params["none"]
  # 'none': the embedding is the L2-normalised pooled tower output itself.
  model = make_model(_config(head="none", embed_dim=32))
  variables = model.init(jax.random.key(0), images, tokens)
  zimg, _, extras = model.apply(variables, images, tokens)
  pooled = extras["img/pre_logits"]
  np.testing.assert_allclose(zimg, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="embed_dim \\(16\\) equal to the tower width"):
    jax.eval_shape(make_model(_config(head="none", embed_dim=16)).init, jax.random.key(0),
                   images, tokens)
  with pytest.raises(ValueError, match="head"):
    make_model(_config(head="deep"))


def test_per_tower_heads():
  """big_vision's out_dim=(None, D): no image head (its pooled output is the embedding, so
  embed_dim = image width), a linear text head; '' keeps model.head."""
  images, tokens = np.zeros((2, 8, 8, 3), np.float32), np.ones((2, 6), np.int32)
  cfg = _config(embed_dim=32, head="linear",
                image=dict(variant="mu/4", pool="map", head="none"),
                text=dict(variant="mu", vocab_size=11, max_len=6, width=16, num_heads=2,
                          head=""))
  model = make_model(cfg)
  params = model.init(jax.random.key(0), images, tokens)["params"]
  assert "img_head" not in params and params["txt_head"]["kernel"].shape == (16, 32)
  zimg, ztxt, extras = model.apply({"params": params}, images, tokens)
  pooled = extras["img/pre_logits"]
  np.testing.assert_allclose(zimg, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  text_in = extras["txt/pre_logits"] @ params["txt_head"]["kernel"] + params["txt_head"]["bias"]
  np.testing.assert_allclose(ztxt, text_in / np.linalg.norm(text_in, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  cfg.image.head, cfg.text.head = "", "none"  # text width 16 != embed_dim 32
  with pytest.raises(ValueError, match=r"model.head='none' \(txt tower\) needs embed_dim"):
    jax.eval_shape(make_model(cfg).init, jax.random.key(0), images, tokens)
  cfg.text.head = "deep"
  with pytest.raises(ValueError, match="config.model.text.head='deep'"):
    make_model(cfg)
