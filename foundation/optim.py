"""The optimizer: AdamW with linear warmup, cosine decay to a floor, and global-norm clipping."""

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """0 -> optim.lr linearly over warmup_steps, then cosine down to lr * min_lr_ratio."""
  o = config.optim
  decay_steps = config.steps if o.decay_steps == -1 else o.decay_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=o.lr,
      warmup_steps=o.warmup_steps,
      # optax counts the warmup inside decay_steps; keep it at least one step past the warmup.
      decay_steps=max(decay_steps, o.warmup_steps + 1),
      end_value=o.lr * o.min_lr_ratio)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_norm(path) -> bool:
  return any("norm" in name for name in _path_names(path))


def is_embedding(path) -> bool:
  return any("embed" in name for name in _path_names(path))


def weight_decay_mask(params, config):
  """True where weight decay applies: matrices, and norms/embeddings only when configured."""
  o = config.optim

  def decays(path, _):
    if is_norm(path):
      return o.decay_norms
    if is_embedding(path):
      return o.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  clip = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, mask=lambda params: weight_decay_mask(params, config))
  optimizer = optax.chain(*clip, adamw)
  # With LoRA (or `trainable` naming a subset) only those params train: the rest get no update
  # and no moments.
  from foundation import finetune  # pylint: disable=g-import-not-at-top
  return finetune.freeze_untrained(optimizer, config)
