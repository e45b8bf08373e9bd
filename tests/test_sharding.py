"""Sharding changes speed, never results: one train step on several meshes of 8 CPU devices."""

import functools

import jax
import numpy as np
import pytest

from configs import lm
from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib


def make_config(grad_accum=1, n_kv_heads=2, zero1=False, logits_chunk=0, **mesh):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.optim.warmup_steps = 0  # the first step must move the params (warmup starts at lr 0)
    # Adam's first update is lr * g / (|g| + eps): with the default eps 1e-8 it is lr * sign(g),
    # which hides a wrong gradient's size and flips on reduction-order noise where g is near 0.
    # With eps 1e-3 the update follows g itself, so the comparison below checks the gradients.
    config.optim.eps = 1e-3
    config.model.n_kv_heads = n_kv_heads
    config.model.logits_chunk = logits_chunk
    config.grad_accum = grad_accum
    config.mesh.zero1 = zero1
    for axis in mesh_lib.AXES:
      config.mesh[axis] = mesh.get(axis, 1)
  return config


PARAM_ATOL = 1e-6  # measured: at most 2.4e-7 over the layouts below


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


def one_step(config, devices=None):
  """Init + one train step; returns (loss, params before, params after, state shardings)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  state = step_lib.init_state(model, optimizer, config, mesh, shardings)
  assert step_lib.is_sharded_like(state, shardings)
  initial = jax.device_get(state["params"])
  train_step, _ = step_lib.jit_steps(model, optimizer, config, mesh, shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))
  with step_lib.sharding_context(config, mesh):
    batch = mesh_lib.make_global_batch(packed_batch(config), batch_sharding)
    state, metrics = train_step(state, batch)
  assert step_lib.is_sharded_like(state, shardings)
  return float(metrics["loss"]), initial, jax.device_get(state["params"]), shardings


@functools.cache
def reference(n_kv_heads: int):
  """The step on a single device: the plain, unsharded computation."""
  loss, initial, params, _ = one_step(make_config(n_kv_heads=n_kv_heads), jax.devices()[:1])
  return loss, initial, params


def assert_same_step(config, loss, params):
  ref_loss, initial, ref_params = reference(config.model.n_kv_heads)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # The step moved the params (so equality below is not vacuous) ...
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial)
  assert min(jax.tree.leaves(moved)) > 1e-4
  # ... and moved them identically to float32 tolerance.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4),
               params, ref_params)


LAYOUTS = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data2-fsdp2-tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp2-tensor4": dict(fsdp=2, tensor=4, n_kv_heads=4),
    "fsdp4-sequence2": dict(fsdp=4, sequence=2),
    "data2-sequence2-tensor2": dict(data=2, sequence=2, tensor=2),
    "data8-zero1": dict(data=8, zero1=True),
    # Not a layout, the same promise: logits and cross-entropy 8 positions at a time.
    "fsdp8-logits-chunk8": dict(fsdp=8, logits_chunk=8),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_is_the_same_on_every_mesh(layout):
  config = make_config(**LAYOUTS[layout])
  loss, _, params, _ = one_step(config)
  assert_same_step(config, loss, params)


def test_gradient_accumulation_matches_one_step_on_the_whole_batch():
  # 32 rows as 4 micro-batches of 8 (one row per device each) vs the 32 rows at once.
  accumulated, whole = make_config(grad_accum=4, data=2, fsdp=4), make_config(data=2, fsdp=4)
  for config in (accumulated, whole):
    with config.unlocked():
      config.batch_size = 32
  loss, _, params, _ = one_step(accumulated)
  whole_loss, _, whole_params, _ = one_step(whole)
  np.testing.assert_allclose(loss, whole_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4),
               params, whole_params)


def test_zero1_splits_the_adam_moments_over_data():
  _, _, _, shardings = one_step(make_config(data=8, zero1=True))
  assert not any("data" in str(s.spec) for s in jax.tree.leaves(shardings["params"]))
  flat = jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0]
  moments = {jax.tree_util.keystr(path): s for path, s in flat
             if ".mu" in jax.tree_util.keystr(path) or ".nu" in jax.tree_util.keystr(path)}
  matrices = [k for k in moments if "kernel" in k or "embedding" in k]
  assert len(matrices) == 2 * 9  # mu and nu of 7 block matrices, the embedding, the output
  for key in matrices:
    assert "data" in str(moments[key].spec), (key, moments[key].spec)


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
