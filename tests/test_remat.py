"""Rematerialisation (model.<tower>.remat) changes memory, never numbers: forward and gradients
equal the plain model's, per-layer and scanned, with the same parameter tree."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siglip_fair.models import make_model
from siglip_fair.train.losses import contrastive_loss


def _config(remat, scan, dropout):
  tower = dict(scan=scan, remat=remat, depth=2, dropout=dropout)
  return ml_collections.ConfigDict(dict(
      image=dict(variant="mu/4", pool="map", **tower),
      text=dict(variant="mu", vocab_size=20, max_len=6, pool="last", **tower),
      embed_dim=16, t_init=10.0, b_init=-10.0))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_plain_models_loss_and_gradients(remat, scan):
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(1, 20, size=(6, 6)), jnp.int32)
  plain, rematted = make_model(_config("none", scan, 0.1)), make_model(_config(remat, scan, 0.1))
  params = plain.init(jax.random.key(0), image, text)["params"]
  assert (jax.tree.map(np.shape, rematted.init(jax.random.key(0), image, text)["params"])
          == jax.tree.map(np.shape, params))

  def loss(model, p):
    # train=True with dropout: the recomputed forward must draw the same masks.
    zimg, ztxt, extras = model.apply({"params": p}, image, text, train=True,
                                     rngs={"dropout": jax.random.key(1)})
    return contrastive_loss("sigmoid", zimg, ztxt, extras)[0]

  want = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  got = jax.jit(jax.value_and_grad(lambda p: loss(rematted, p)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1],
               want[1])
  # The recomputation is really there: the traced program holds JAX's checkpoint primitive
  # (remat), which the plain model's does not.
  traced = lambda model: str(jax.make_jaxpr(lambda p: loss(model, p))(params))  # noqa: E731
  assert "remat" in traced(rematted) and "remat" not in traced(plain)


def test_unknown_remat_is_refused():
  config = _config("none", False, 0.0)
  config.image.remat = "some"
  with pytest.raises(ValueError, match=r"model.image.remat='some'; use one of"):
    make_model(config)
