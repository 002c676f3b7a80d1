"""Target networks: ResNet-18 has torchvision's parameter count, BatchNorm behaves as defined."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_fair.debias import nets

# torchvision.models.resnet18(num_classes=1000): 11,689,512 parameters; the head is
# 512 x 1000 + 1000 of them.
TORCHVISION_RESNET18 = 11_689_512


def _count(net, size):
  shapes = jax.eval_shape(lambda: nets.init_variables(net, jax.random.key(0), (size, size, 3)))
  return nets.num_params(shapes["params"])


@pytest.mark.parametrize("classes,small,expected", [
    (1000, False, TORCHVISION_RESNET18),
    (2, False, TORCHVISION_RESNET18 - 513_000 + 1_026),
    # A 3x3 stem instead of 7x7: 3*3*3*64 weights instead of 7*7*3*64.
    (2, True, TORCHVISION_RESNET18 - 513_000 + 1_026 - 9_408 + 1_728),
])
def test_resnet18_parameter_count_matches_torchvision(classes, small, expected):
  assert _count(nets.ResNet18(classes, small_images=small), 64) == expected


def test_stem_batchnorm_updates_running_mean_by_momentum():
  net = nets.ResNet18(3, width=8, small_images=True)
  variables = nets.init_variables(net, jax.random.key(0), (16, 16, 3))
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  logits, stats = nets.apply(net, variables, x, train=True)
  assert logits.shape == (4, 3) and np.isfinite(np.asarray(logits)).all()
  # The stem convolution computed independently; BN's running mean starts at 0, so after one
  # step it is (1 - momentum) * batch mean.
  kernel = variables["params"]["Conv_0"]["kernel"]
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], 0.1 * conv.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # Evaluation uses the running statistics: an example's logits do not depend on its batch.
  new_vars = {**variables, "batch_stats": stats}
  batch, _ = nets.apply(net, new_vars, x, train=False)
  alone, _ = nets.apply(net, new_vars, x[:1], train=False)
  np.testing.assert_allclose(batch[:1], alone, rtol=1e-5, atol=1e-5)
  train_batch, _ = nets.apply(net, new_vars, x, train=True)
  train_alone, _ = nets.apply(net, new_vars, jnp.concatenate([x[:1], -x[1:]]), train=True)
  assert not np.allclose(train_batch[:1], train_alone[:1])


def test_small_cnn_shapes_and_errors():
  net = nets.make_net("small_cnn", 5, width=8)
  variables = nets.init_variables(net, jax.random.key(0), (16, 16, 3))
  assert "batch_stats" not in variables
  logits, stats = nets.apply(net, variables, jnp.zeros((2, 16, 16, 3)), train=True)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32 and stats is None
  with pytest.raises(ValueError, match="resnet18.*small_cnn"):
    nets.make_net("vgg", 2)
