"""FSDP sharding rules, and the 20-step loss curve of data-parallel / FSDP meshes on 8 (fake)
devices against one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from siglip_fair.train.sharding import (DEFAULT_RULES, batch_sharding, global_batch, make_mesh,
                                        state_shardings)
from siglip_fair.train.state import make_train_step
from test_train import _step_setup, _train_iter


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  mesh = make_mesh({"data": 2, "fsdp": 4})
  tree = {"kernel": jax.ShapeDtypeStruct((12, 32), jnp.float32),   # 32 > 12, both divide
          "embed": jax.ShapeDtypeStruct((320, 6), jnp.float32),    # only 320 divides
          "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),        # nothing divides: replicate
          "conv": jax.ShapeDtypeStruct((4, 4, 3, 8), jnp.float32),  # tie 8 vs 4s -> 8
          "scalar": jax.ShapeDtypeStruct((), jnp.float32)}
  specs = {k: s.spec for k, s in state_shardings(tree, mesh, [(".*", "fsdp")]).items()}
  assert specs == {"kernel": P(None, "fsdp"), "embed": P("fsdp"), "odd": P(),
                   "conv": P(None, None, None, "fsdp"), "scalar": P()}
  # Without an fsdp axis the default rule replicates, so one default serves every mesh.
  plain = state_shardings(tree, make_mesh({"data": -1}), DEFAULT_RULES)
  assert all(s.spec == P() for s in jax.tree.leaves(plain))
  # Rules are ordered: the first full match wins.
  mixed = state_shardings(tree, mesh, [("kernel", "replicate"), (".*", "fsdp")])
  assert mixed["kernel"].spec == P() and mixed["embed"].spec == P("fsdp")


def test_batch_is_split_over_every_batch_axis():
  mesh = make_mesh({"data": 2, "fsdp": 4})
  assert batch_sharding(mesh).spec == P(("data", "fsdp"))
  local = {"text": np.arange(16, dtype=np.int32)[:, None]}
  x = global_batch(local, mesh)["text"]
  rows = sorted(int(np.asarray(s.data)[0, 0]) for s in x.addressable_shards)
  assert rows == list(range(0, 16, 2))  # 8 distinct blocks of 2 rows
  with pytest.raises(ValueError, match="no batch axis"):
    batch_sharding(make_mesh({"model": -1}))
  with pytest.raises(ValueError, match="divisible"):
    global_batch({"text": np.zeros((12, 2), np.int32)}, mesh)


def _curve(mesh_cfg, devices, loss_impl="full", steps=20):
  config, _, model, tx, schedule, initial = _step_setup()
  mesh = make_mesh(mesh_cfg, devices=devices)
  shardings = state_shardings(initial, mesh, DEFAULT_RULES)
  state = jax.device_put(initial, shardings)
  step = make_train_step(model, tx, config.loss, schedule=schedule, state_sharding=shardings,
                         batch_sharding=batch_sharding(mesh), loss_impl=loss_impl)
  it = _train_iter()
  curve = []
  for _ in range(steps):
    batch = {k: v for k, v in next(it).items() if k != "label"}
    state, metrics = step(state, global_batch(batch, mesh))
    curve.append(float(metrics["loss"]))
  return np.asarray(curve), state


@pytest.fixture(scope="module")
def single_device_curve():
  return _curve({"data": -1}, jax.devices()[:1])[0]


# Pure data parallelism on 8 devices against one: test_train.py (the one-compile step test).
@pytest.mark.parametrize("mesh_cfg,loss_impl", [
    ({"data": 2, "fsdp": 4}, "full"), ({"data": 2, "fsdp": 4}, "ring")])
def test_8_device_meshes_match_one_device_for_20_steps(single_device_curve, mesh_cfg,
                                                       loss_impl):
  curve, state = _curve(mesh_cfg, jax.devices(), loss_impl)
  assert curve[-1] < 0.8 * curve[0]  # the run really trains, so the curves carry information
  np.testing.assert_allclose(curve, single_device_curve, rtol=1e-5, atol=0)
  if "fsdp" in mesh_cfg:  # the state is really split: a kernel's shard holds 1/fsdp of it
    kernel = state.params["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"][
        "kernel"]
    assert kernel.addressable_shards[0].data.size * mesh_cfg["fsdp"] == kernel.size
    split = [x for x in jax.tree.leaves(state.opt_state) if not x.sharding.is_fully_replicated]
    assert len(split) >= len(jax.tree.leaves(state.params)) // 2  # Adam's moments follow
