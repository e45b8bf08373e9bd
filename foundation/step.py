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
from foundation import mesh as mesh_lib
from foundation import optim
from foundation.models import transformer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# A classifier's batches (config.model.num_classes > 0): one example per row, a label per row.
CLASSIFY_KEYS = ("inputs", "segment_ids", "positions", "labels", "last_index", "label_mask")


def is_classifier(config) -> bool:
  return config.model.get("num_classes", 0) > 0


def make_model(config) -> transformer.Transformer:
  return transformer.Transformer(transformer.ModelConfig.from_config(config.model))


def _dummy_inputs(config, batch: int = 1):
  tokens = jnp.zeros((batch, config.seq_len), jnp.int32)
  return tokens, tokens, jnp.ones_like(tokens)  # tokens, positions, segment_ids


def initial_guard() -> dict:
  """The bad-step guard's state: a running mean of good losses and skip counters."""
  return {"loss_mean": jnp.zeros((), jnp.float32), "good_steps": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32), "skipped_in_a_row": jnp.zeros((), jnp.int32)}


def _boxed_state(model, optimizer, config, rng):
  """The state with params still in their nn.Partitioned boxes (logical names attached)."""
  params = model.init(rng, *_dummy_inputs(config))["params"]
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


def cross_entropy_sums(logits, targets, loss_mask):
  """Token cross-entropy and log(Z)^2 (the PaLM z-loss term), summed over loss_mask.

  logits: [B, L, V] (computed in float32 here); targets, loss_mask: int [B, L].
  Returns float32 scalars (ce_sum, z_sum). Sums, not means, so that micro-batches, chunks and
  hosts add up exactly; divide by the token count once.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return ((log_z - target_logit) * mask).sum(), (jnp.square(log_z) * mask).sum()


def loss_sums(model, params, batch, chunk: int = 0, rngs=None):
  """(ce_sum, z_sum) of the model on one batch.

  chunk > 0: the logits are made `chunk` positions at a time inside a rematerialised scan, so the
  float32 [batch, seq, vocab] tensor never exists whole, forward or backward; only [batch, chunk,
  vocab] does. Same numbers, less memory, a second output matmul in the backward pass.
  """
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  # rngs: {'dropout': key} when LoRA dropout trains; otherwise the model is deterministic.
  dropout = {"deterministic": False, "rngs": rngs} if rngs else {}
  if not chunk or chunk >= batch["inputs"].shape[1]:
    logits = model.apply({"params": params}, *args, **dropout)
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
  hidden = model.apply({"params": params}, *args, return_hidden=True, **dropout)

  def by_chunk(x):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
    x = x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch", "length", "act_embed")[:x.ndim])

  @jax.checkpoint
  def chunk_sums(hidden_chunk, targets, loss_mask):
    logits = nn.with_logical_constraint(
        transformer.output_logits(model.cfg, params, hidden_chunk), ("batch", "length", "act_vocab"))
    return cross_entropy_sums(logits, targets, loss_mask)

  def add_chunk(sums, chunk_inputs):
    ce, z = chunk_sums(*chunk_inputs)
    return (sums[0] + ce, sums[1] + z), None

  chunks = (by_chunk(hidden), by_chunk(batch["targets"]), by_chunk(batch["loss_mask"]))
  sums, _ = jax.lax.scan(add_chunk, (jnp.float32(0), jnp.float32(0)), chunks)
  return sums


def split_micro_batches(batch, n: int):
  """[B, ...] arrays -> [n, B / n, ...] without moving data between devices.

  Row r goes to micro-batch r % n: every device's contiguous block of rows holds an equal share of
  each micro-batch, so the split keeps the batch sharding (the rows' order within the summed
  gradient does not matter).
  """
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch", "length"))
  return jax.tree.map(split, batch)


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


def make_train_step(model, optimizer, config):
  """step(state, batch) -> (state, metrics); pure, to be jitted with shardings.

  With config.grad_accum = n > 1 the batch is processed as n micro-batches in a lax.scan, the
  gradients summed: the same update as one step on the whole batch, with 1/n of the activations.
  A step with non-finite loss or gradients, or whose new params or optimizer state are not finite
  (or a loss spike, when guarded), leaves params and optimizer state exactly as they were;
  metrics['skipped'] says so (metrics['nonfinite_update'] = 1: the result was not finite).
  """
  schedule = optim.learning_rate_schedule(config)
  z_weight = config.optim.z_loss
  # Fault injection (guard.inject_nan_at) is in every run's program, with step -1 when there is
  # none: a drill compiles the very program of a clean run, so its checkpoints are bit-identical.
  nan_steps = jnp.asarray(config_lib.inject_nan_steps(config) or (-1,), jnp.int32)

  classifier = is_classifier(config)

  def scaled_loss(params, batch, n_tokens, rngs):
    if classifier:  # cross-entropy over the classes of each row's last token
      sums = finetune.classify_loss_sums(model, params, batch, deterministic=not rngs, rngs=rngs)
      return sums["ce_sum"] / n_tokens, (sums["ce_sum"], jnp.float32(0))
    ce_sum, z_sum = loss_sums(model, params, batch, config.model.logits_chunk, rngs)
    return (ce_sum + z_weight * z_sum) / n_tokens, (ce_sum, z_sum)

  grad_fn = jax.grad(scaled_loss, has_aux=True)

  def accumulated_grads(params, batch, n_tokens, rngs):
    def add_micro(carry, micro):
      grads, ce_sum, z_sum = carry
      g, (ce, z) = grad_fn(params, micro, n_tokens, rngs)
      return (jax.tree.map(jnp.add, grads, g), ce_sum + ce, z_sum + z), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, ce_sum, z_sum), _ = jax.lax.scan(
        add_micro, (zeros, jnp.float32(0), jnp.float32(0)),
        split_micro_batches(batch, config.grad_accum))
    return grads, (ce_sum, z_sum)

  def train_step(state, batch):
    weights = batch["label_mask"] if classifier else batch["loss_mask"]
    n_tokens = jnp.maximum(weights.sum().astype(jnp.float32), 1.0)
    rngs = finetune.dropout_rngs(config, state["step"])
    if config.grad_accum > 1:
      grads, (ce_sum, z_sum) = accumulated_grads(state["params"], batch, n_tokens, rngs)
    else:
      grads, (ce_sum, z_sum) = grad_fn(state["params"], batch, n_tokens, rngs)
    # Frozen params (LoRA's base) get no update; their gradients do not count in the norm.
    grads = finetune.masked_grads(grads, finetune.trainable_mask(state["params"], config))
    poisoned = jnp.isin(state["step"] + 1, nan_steps)  # fault injection: NaN gradients
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
    loss, grad_norm = ce_sum / n_tokens, optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    mask = finetune.trainable_mask(state["params"], config)  # frozen leaves: the same bits
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
               "nonfinite_update": (~result_finite).astype(jnp.int32)}
    if z_weight:
      metrics["z_loss"] = z_weight * z_sum / n_tokens
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "guard": guard}, metrics

  return train_step


def make_eval_step(model, config):
  """eval_step(params, batch) -> {'loss_sum', 'tokens'}: sums, so hosts and batches add up exactly."""

  def eval_step(params, batch):
    if is_classifier(config):  # 'tokens' counts rows here: the loss is per example
      sums = finetune.classify_loss_sums(model, params, batch)
      return {"loss_sum": sums["ce_sum"], "tokens": sums["count"], "correct": sums["correct"]}
    ce_sum, _ = loss_sums(model, params, batch, config.model.logits_chunk)
    return {"loss_sum": ce_sum, "tokens": batch["loss_mask"].sum()}

  return eval_step


def jit_steps(model, optimizer, config, mesh: Mesh, shardings):
  """The train step (state donated) and eval step, jitted with explicit in/out shardings."""
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))
  per_row = ("labels", "last_index", "label_mask")
  batch_shardings = {k: mesh_lib.for_rank(batch_sharding, 1 if k in per_row else 2)
                     for k in (CLASSIFY_KEYS if is_classifier(config) else BATCH_KEYS)}
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
