"""Sharding changes speed, never results: one train step on several meshes of 8 CPU devices."""

import jax
import numpy as np
import pytest

from configs import lm
from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib


def make_config(**mesh):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.optim.warmup_steps = 0  # the first step must move the params (warmup starts at lr 0)
    for axis in ("data", "fsdp", "tensor"):
      config.mesh[axis] = mesh.get(axis, 1)
  return config


def packed_batch(config, seed=0):
  """A host batch of two documents per row, positions restarting at each document."""
  rng = np.random.default_rng(seed)
  b, l = config.batch_size, config.seq_len
  tokens = rng.integers(3, 259, size=(b, l + 1), dtype=np.int32)
  cut = l // 3
  segment_ids = np.where(np.arange(l) < cut, 1, 2).astype(np.int32)[None].repeat(b, 0)
  positions = np.where(np.arange(l) < cut, np.arange(l), np.arange(l) - cut).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions[None].repeat(b, 0), "loss_mask": np.ones((b, l), np.int32)}


def one_step(config):
  """Init + one train step; returns (loss, updated params on host, state shardings, mesh)."""
  mesh = mesh_lib.make_mesh(config.mesh)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  state = step_lib.init_state(model, optimizer, config, mesh, shardings)
  assert step_lib.is_sharded_like(state, shardings)
  train_step, _ = step_lib.jit_steps(model, optimizer, config, mesh, shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))
  with step_lib.sharding_context(config, mesh):
    batch = mesh_lib.make_global_batch(packed_batch(config), batch_sharding)
    state, metrics = train_step(state, batch)
  assert step_lib.is_sharded_like(state, shardings)
  return float(metrics["loss"]), jax.device_get(state["params"]), shardings, mesh


@pytest.fixture(scope="module")
def reference():
  """The step on a single device: the plain, unsharded computation."""
  config = make_config()
  mesh_devices = jax.devices()[:1]
  mesh = mesh_lib.make_mesh(config.mesh, mesh_devices)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  state = step_lib.init_state(model, optimizer, config, mesh, shardings)
  train_step, _ = step_lib.jit_steps(model, optimizer, config, mesh, shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))
  initial = jax.device_get(state["params"])
  with step_lib.sharding_context(config, mesh):
    batch = mesh_lib.make_global_batch(packed_batch(config), batch_sharding)
    state, metrics = train_step(state, batch)
  return float(metrics["loss"]), jax.device_get(state["params"]), initial


@pytest.mark.parametrize("mesh", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_one_step_is_the_same_on_every_mesh(mesh, reference):
  ref_loss, ref_params, initial = reference
  loss, params, shardings, device_mesh = one_step(make_config(**mesh))
  assert device_mesh.devices.size == 8
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # The step moved the params (so equality below is not vacuous) ...
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial)
  assert min(jax.tree.leaves(moved)) > 1e-4
  # ... and moved them identically to float32 tolerance.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               params, ref_params)


def test_params_are_really_split_as_the_rules_say():
  config = make_config(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = step_lib.make_model(config)
  _, shardings = step_lib.state_shardings(model, optim.make_optimizer(config), config, mesh)
  params = shardings["params"]
  # q kernel [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor.
  assert tuple(params["layers"]["attn"]["q"]["kernel"].spec) == (None, "fsdp", "tensor", None)
  # The Adam moments follow the params they belong to.
  mu = shardings["opt_state"]
  specs = {str(s.spec) for s in jax.tree.leaves(mu)}
  assert "P(None, 'fsdp', 'tensor', None)" in specs


def test_fsdp_stores_one_eighth_of_each_split_param_per_device():
  config = make_config(fsdp=8)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  state = step_lib.init_state(model, optimizer, config, mesh, shardings)
  embedding = state["params"]["embed"]["embedding"]
  shard = embedding.addressable_shards[0].data
  assert shard.shape == (embedding.shape[0], embedding.shape[1] // 8)
