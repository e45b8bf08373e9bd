"""The train state, born sharded, and the jitted train and eval steps.

The state is a plain dict: {'step': int32 scalar, 'params': tree, 'opt_state': optax state}.
Its shardings come from the logical axis names the model puts on its params: `jax.eval_shape` of
the init gives shapes and names without allocating, the rules map names to mesh axes, and the init
itself is jitted with those `out_shardings`, so no param ever exists unsharded.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from foundation import config as config_lib
from foundation import mesh as mesh_lib
from foundation import optim
from foundation.models import transformer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def make_model(config) -> transformer.Transformer:
  return transformer.Transformer(transformer.ModelConfig.from_config(config.model))


def _dummy_inputs(config, batch: int = 1):
  tokens = jnp.zeros((batch, config.seq_len), jnp.int32)
  return tokens, tokens, jnp.ones_like(tokens)  # tokens, positions, segment_ids


def _boxed_state(model, optimizer, config, rng):
  """The state with params still in their nn.Partitioned boxes (logical names attached)."""
  params = model.init(rng, *_dummy_inputs(config))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def state_shardings(model, optimizer, config, mesh: Mesh):
  """(abstract state with shardings, tree of NamedShardings) for the train state."""
  axis_rules = mesh_lib.rules(config)
  boxed = jax.eval_shape(
      functools.partial(_boxed_state, model, optimizer, config), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = mesh_lib.logical_to_sharding(specs, mesh, axis_rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  config_lib.check_param_shardings(abstract["params"], shardings["params"], mesh)
  return abstract, shardings


def init_state(model, optimizer, config, mesh: Mesh, shardings):
  """Creates the train state directly in its shardings from `config.seed`."""
  init = jax.jit(
      lambda rng: nn.unbox(_boxed_state(model, optimizer, config, rng)),
      out_shardings=shardings)
  # No mesh context here: out_shardings alone lay the state out, and Flax would otherwise constrain
  # DenseGeneral kernels, which it initialises flattened, with their unflattened names.
  with nn.logical_axis_rules(mesh_lib.rules(config)):
    return init(jax.random.key(config.seed))


def cross_entropy(logits, targets, loss_mask, z_loss: float = 0.0):
  """Mean token cross-entropy over loss_mask, and the PaLM z-loss term (both float32 scalars).

  logits: float32 [B, L, V]; targets, loss_mask: int32 [B, L]. Returns (ce_mean, z_mean, n_tokens).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  n_tokens = jnp.maximum(mask.sum(), 1.0)
  ce = ((log_z - target_logit) * mask).sum() / n_tokens
  z = z_loss * ((log_z ** 2) * mask).sum() / n_tokens
  return ce, z, n_tokens


def make_train_step(model, optimizer, config):
  """step(state, batch) -> (state, metrics); pure, to be jitted with shardings."""
  schedule = optim.learning_rate_schedule(config)

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"])
    ce, z, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"], config.optim.z_loss)
    return ce + z, {"loss": ce, **({"z_loss": z} if config.optim.z_loss else {})}

  def train_step(state, batch):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(model, config):
  """eval_step(params, batch) -> {'loss_sum', 'tokens'}: sums, so hosts and batches add up exactly."""

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"])
    ce, _, n_tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return {"loss_sum": ce * n_tokens, "tokens": batch["loss_mask"].sum()}

  return eval_step


def jit_steps(model, optimizer, config, mesh: Mesh, shardings):
  """The train step (state donated) and eval step, jitted with explicit in/out shardings."""
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  replicated = mesh_lib.replicated(mesh)
  train_step = jax.jit(
      make_train_step(model, optimizer, config),
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(model, config),
      in_shardings=(shardings["params"], batch_shardings),
      out_shardings=replicated)
  return train_step, eval_step


@contextlib.contextmanager
def sharding_context(config, mesh: Mesh):
  """The context every traced call runs in: the mesh, and the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.rules(config)):
    yield


def is_sharded_like(tree, shardings) -> bool:
  """True when every array of `tree` has the sharding of `shardings` (for tests and asserts)."""
  return all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
             zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
                 x, NamedSharding))))
