"""big_vision loading: position-embedding resizing and the loader's errors."""
import jax
import ml_collections
import numpy as np
import pytest

from siglip_fair.models import make_model
from siglip_fair.models import big_vision as bv
from siglip_fair.models.posemb import resize_posemb
from test_big_vision import TOKENS, big_vision_forward, bv_checkpoint

ndimage = pytest.importorskip("scipy.ndimage")


@pytest.mark.parametrize("src,dst", [(3, (5, 5)), (4, (3, 3)), (3, (7, 4)), (2, (4, 4))])
def test_zoom_is_big_vision_scipy_zoom(src, dst):
  x = np.random.default_rng(0).normal(size=(1, src * src, 6)).astype(np.float32)
  # big_vision's resample_posemb: scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1).
  want = ndimage.zoom(x.reshape(src, src, 6).astype(np.float64),
                      (dst[0] / src, dst[1] / src, 1), order=1)
  got = resize_posemb(x, dst)
  assert got.shape == (1, dst[0] * dst[1], 6) and got.dtype == np.float32
  np.testing.assert_allclose(got.reshape(*dst, 6), want, atol=1e-6)
  assert resize_posemb(x, (src, src)) is x


def _half_pixel_bilinear(grid, size):
  """Independent bilinear resize with half-pixel centres and edge clamping, one axis at a time."""
  for axis, n_out in enumerate(size):
    n_in = grid.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo)[(slice(None),) + (None,) * (grid.ndim - 1 - axis)]
    grid = np.take(grid, lo, axis) * (1 - frac) + np.take(grid, hi, axis) * frac
  return grid


def test_jax_bilinear_method():
  x = np.random.default_rng(1).normal(size=(1, 9, 4)).astype(np.float32)
  got = resize_posemb(x, (5, 6), method="bilinear").reshape(5, 6, 4)
  np.testing.assert_allclose(got, _half_pixel_bilinear(x.reshape(3, 3, 4), (5, 6)), atol=1e-5)
  with pytest.raises(ValueError, match="method='area'"):
    resize_posemb(x, (5, 5), method="area")


def _released(**kw):
  return bv_checkpoint(**{**dict(img_pool="map", txt_pool="last", bias=True, scan=False,
                                 embed_dim=16, img_head=False, prefix="params/"), **kw})


def test_loading_at_another_resolution_resizes_like_big_vision():
  flat = _released(grid=2)  # trained at 8 px, patch 4
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  with pytest.raises(ValueError, match=r"2x2 patch grid.*16x16 px images need a 4x4 grid"):
    bv.from_big_vision(flat, image_size=16)
  with pytest.raises(ValueError, match="not a multiple of the checkpoint's patch size 4"):
    bv.from_big_vision(flat, image_size=18, resize_posemb=True)
  stored = bv.from_big_vision(flat, image_size=8)["img"]["pos_embedding"]
  np.testing.assert_array_equal(stored, flat["params/img/pos_embedding"])
  cfg = ml_collections.ConfigDict(bv.model_config(flat))
  params = bv.from_big_vision(flat, image_size=16, resize_posemb=True)
  bv.check_params(cfg, params, 16)
  with pytest.raises(ValueError, match=r"img/pos_embedding: checkpoint \(1, 16, 16\), "
                                       r"model \(1, 4, 16\)"):
    bv.check_params(cfg, params, 8)
  zimg, _, _ = jax.jit(make_model(cfg).apply)({"params": params}, images, None)
  resized = dict(flat)
  resized["params/img/pos_embedding"] = ndimage.zoom(
      flat["params/img/pos_embedding"].reshape(2, 2, 16).astype(np.float64), (2, 2, 1),
      order=1).reshape(1, 16, 16)
  want, _, _ = big_vision_forward(resized, "params/", images, TOKENS, "map", "last")
  np.testing.assert_allclose(zimg, want, atol=1e-4)


# ---- errors ----

def test_unknown_layout_names_the_keys():
  hf = {"vision_model.embeddings.patch_embedding.weight": np.zeros((4, 3, 2, 2), np.float32),
        "logit_scale": np.zeros((), np.float32)}
  for loader in (bv.from_big_vision, bv.model_config):
    with pytest.raises(ValueError, match="unknown checkpoint layout.*'logit_scale', "
                                         "'vision_model.embeddings.patch_embedding.weight'"):
      loader(hf)
  vit = {"params/Transformer/encoder_norm/scale": np.ones(4, np.float32),
         "params/head/kernel": np.ones((4, 2), np.float32)}  # a one-tower ViT classifier
  with pytest.raises(ValueError, match="unknown checkpoint layout.*'Transformer/encoder_norm"):
    bv.from_big_vision(vit)


def test_tokenizer_must_fit_the_text_tower():
  flat = _released()
  bv.check_tokenizer(flat, 13, 6)
  bv.check_tokenizer(flat, 8, 4)  # a smaller vocabulary or shorter rows fit
  with pytest.raises(ValueError, match="14 pieces.*txt/Embed_0/embedding has only 13 rows"):
    bv.check_tokenizer(flat, 14)
  with pytest.raises(ValueError, match="7 tokens.*txt/pos_embedding has 6 positions"):
    bv.check_tokenizer(flat, 13, 7)


def test_head_presence_is_per_tower_and_mismatches_name_the_keys():
  released = _released()
  assert "params/img/head/kernel" not in released and "params/txt/head/kernel" in released
  cfg = bv.model_config(released)
  params = bv.from_big_vision(released)
  assert "img_head" not in params and params["txt_head"]["kernel"].shape == (12, 16)
  wrong = ml_collections.ConfigDict(cfg)
  wrong.image.head = "linear"  # the single-`head` config of before: both towers projected
  with pytest.raises(ValueError, match=r"lacks \['img/head/bias', 'img/head/kernel'\]"):
    bv.check_params(wrong, params, 8)
  half = dict(released)
  del half["params/txt/head/bias"]
  with pytest.raises(ValueError, match=r"missing keys \['txt/head/bias'\]"):
    bv.from_big_vision(half)
  # Without an image head the image width is the embedding width; txt/head must match it.
  with pytest.raises(ValueError, match="different tower widths: img tower width gives 16, "
                                       "txt/head/kernel gives 10"):
    bv.model_config(_released(embed_dim=10))
