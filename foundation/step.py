"""The train state, born sharded, and the jitted train and eval steps.

The state is a plain dict: {'step': int32 scalar, 'params': tree, 'opt_state': optax state,
'guard': the bad-step guard's scalars (see `guard_update`)}.
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
from foundation import finetune
from foundation import lora
from foundation import mesh as mesh_lib
from foundation import optim

def family(config):
  """The model family `config.model.family` names (registry; 'decoder' for configs before it)."""
  return config_lib.family_and_task(config)[0]


def make_task(config):
  """The task `config.task` names (registry), built from the config."""
  return config_lib.family_and_task(config)[1]


def make_model(config):
  return family(config).make_model(config)


def _dummy_inputs(config, batch: int = 1):
  """The model's init arguments: the task's dummy batch (zeros; init never reads the values)."""
  task = make_task(config)
  return task.model_args(task.dummy_batch(batch))


def initial_guard() -> dict:
  """The bad-step guard's state: a running mean of good losses and skip counters."""
  return {"loss_mean": jnp.zeros((), jnp.float32), "good_steps": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32), "skipped_in_a_row": jnp.zeros((), jnp.int32)}


def _boxed_state(model, optimizer, config, rng):
  """The state with params still in their nn.Partitioned boxes (logical names attached)."""
  params = model.init(rng, *_dummy_inputs(config))["params"]
  # LoRA's adapters beside their kernels (unchanged without LoRA); the base's init is the same.
  params = lora.add_adapters(params, config, jax.random.fold_in(rng, 1))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
          "guard": initial_guard()}


def state_shardings(model, optimizer, config, mesh: Mesh):
  """(abstract state with shardings, tree of NamedShardings) for the train state."""
  axis_rules = mesh_lib.rules(config)
  boxed = jax.eval_shape(
      functools.partial(_boxed_state, model, optimizer, config), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = mesh_lib.logical_to_sharding(specs, mesh, axis_rules)
  if config.mesh.zero1:
    shardings["opt_state"] = jax.tree.map(
        lambda x, s: mesh_lib.also_split_over(s, x.shape, "data"),
        nn.unbox(boxed)["opt_state"], shardings["opt_state"])
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  config_lib.check_param_shardings(abstract["params"], shardings["params"], mesh)
  return abstract, shardings


def init_state(model, optimizer, config, mesh: Mesh, shardings):
  """Creates the train state directly in its shardings from `config.seed`."""
  init = jax.jit(
      lambda rng: nn.unbox(_boxed_state(model, optimizer, config, rng)),
      out_shardings=shardings)
  with sharding_context(config, mesh):
    return init(jax.random.key(config.seed))


def split_micro_batches(batch, n: int, spec: dict):
  """[B, ...] arrays -> [n, B / n, ...] without moving data between devices.

  Row r goes to micro-batch r % n: every device's contiguous block of rows holds an equal share of
  each micro-batch, so the split keeps the batch sharding (the rows' order within the summed
  gradient does not matter). `spec`: the task's batch spec (each key's logical axes).
  """
  def split(key, x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, *spec[key].axes))
  return {k: split(k, v) for k, v in batch.items()}


SPIKE_MEAN_DECAY = 0.99  # the running loss mean of the spike guard spans about 100 steps


def all_finite(tree):
  """True (a bool scalar) when every number in `tree` is finite: one fused reduction, no copy."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def guard_update(guard: dict, loss, grad_norm, config, result_finite=True):
  """(apply, new guard): whether this step's update may be applied, and the guard's new state.

  An update is refused when its loss or gradient norm is not finite, when its result (the new
  params and optimizer state: `result_finite`) is not (a huge or NaN learning rate, an overflow
  in the optimizer), or (guard.loss_spike > 0) when its loss is above loss_spike x the running
  mean of the good steps' losses.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & result_finite
  spike = config.guard.loss_spike
  if spike:
    ok &= ~((guard["good_steps"] >= config.guard.spike_warmup) & (loss > spike * guard["loss_mean"]))
  mean = jnp.where(guard["good_steps"] == 0, loss,
                   SPIKE_MEAN_DECAY * guard["loss_mean"] + (1 - SPIKE_MEAN_DECAY) * loss)
  bad = (~ok).astype(jnp.int32)
  return ok, {"loss_mean": jnp.where(ok, mean, guard["loss_mean"]),
              "good_steps": guard["good_steps"] + 1 - bad,
              "skipped": guard["skipped"] + bad,
              "skipped_in_a_row": (guard["skipped_in_a_row"] + 1) * bad}


def make_train_step(model, optimizer, config, task=None):
  """step(state, batch) -> (state, metrics); pure, to be jitted with shardings.

  The task gives the loss as sums (`task.loss_sums`), what is differentiated (`task.objective`)
  and what the sums are divided by (`task.count`: tokens or rows, over the whole batch).
  With config.grad_accum = n > 1 the batch is processed as n micro-batches in a lax.scan, the
  gradients and sums added: the same update as one step on the whole batch, with 1/n of the
  activations. A step with non-finite loss or gradients, or whose new params or optimizer state
  are not finite (or a loss spike, when guarded), leaves params and optimizer state exactly as
  they were; metrics['skipped'] says so (metrics['nonfinite_update'] = 1: the result was not
  finite).
  """
  task = task or make_task(config)
  schedule = optim.learning_rate_schedule(config)
  frozen = finetune.has_frozen_params(config)  # LoRA's base, a linear probe's encoder
  # Fault injection (guard.inject_nan_at) is in every run's program, with step -1 when there is
  # none: a drill compiles the very program of a clean run, so its checkpoints are bit-identical.
  nan_steps = jnp.asarray(config_lib.inject_nan_steps(config) or (-1,), jnp.int32)

  def scaled_loss(params, batch, count, rngs):
    # LoRA's transform (adapters merged into their kernels) is differentiated through.
    sums = task.loss_sums(model, lora.model_params(params, config), batch, rngs)
    return task.objective(sums) / count, sums

  grad_fn = jax.grad(scaled_loss, has_aux=True)

  def accumulated_grads(params, batch, count, rngs):
    micro_batches = split_micro_batches(batch, config.grad_accum, task.batch_spec())

    def add_micro(carry, micro):
      g, sums = grad_fn(params, micro, count, rngs)
      return jax.tree.map(jnp.add, carry, (g, sums)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, count, rngs))
    (grads, sums), _ = jax.lax.scan(add_micro, zeros, micro_batches)
    return grads, sums

  def train_step(state, batch):
    count = task.count(batch)
    rngs = {}  # no dropout in the built-in tasks
    if config.grad_accum > 1:
      grads, sums = accumulated_grads(state["params"], batch, count, rngs)
    else:
      grads, sums = grad_fn(state["params"], batch, count, rngs)
    if frozen:  # frozen params get no update; their gradients do not count in the norm
      mask = finetune.trainable_mask(state["params"], config)
      grads = finetune.masked_grads(grads, mask)
    poisoned = jnp.isin(state["step"] + 1, nan_steps)  # fault injection: NaN gradients
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
    task_metrics = task.train_metrics(sums, count)
    loss, grad_norm = task_metrics["loss"], optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if frozen:  # frozen leaves: the same bits
      params = jax.tree.map(lambda new, old, m: new if m else old, params, state["params"], mask)
    # The result is checked too: finite gradients times a NaN or overflowing learning rate.
    result_finite = all_finite((params, opt_state))
    apply, guard = guard_update(state["guard"], loss, grad_norm, config, result_finite)
    keep_if_bad = lambda new, old: jnp.where(apply, new, old)
    params = jax.tree.map(keep_if_bad, params, state["params"])
    opt_state = jax.tree.map(keep_if_bad, opt_state, state["opt_state"])
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "lr": schedule(state["step"]), "skipped": guard["skipped"],
               "skipped_in_a_row": guard["skipped_in_a_row"],
               "nonfinite_update": (~result_finite).astype(jnp.int32),
               **{k: v for k, v in task_metrics.items() if k != "loss"}}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "guard": guard}, metrics

  return train_step


def make_eval_step(model, config, task=None):
  """eval_step(params, batch) -> the task's eval sums (with 'count'): hosts and batches add up."""
  task = task or make_task(config)

  def eval_step(params, batch):
    return task.eval_sums(model, lora.model_params(params, config), batch)

  return eval_step


def batch_shardings(config, mesh: Mesh, task=None) -> dict:
  """{key: NamedSharding} of the task's batch, from each key's logical axes and the rules."""
  task = task or make_task(config)
  return mesh_lib.batch_shardings(mesh, mesh_lib.rules(config), task.batch_spec())


def jit_steps(model, optimizer, config, mesh: Mesh, shardings, task=None):
  """The train step (state donated) and eval step, jitted with explicit in/out shardings."""
  task = task or make_task(config)
  batch = batch_shardings(config, mesh, task)
  replicated = mesh_lib.replicated(mesh)
  train_step = jax.jit(
      make_train_step(model, optimizer, config, task),
      in_shardings=(shardings, batch),
      out_shardings=(shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(model, config, task),
      in_shardings=(shardings["params"], batch),
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
