"""Fine-tuning pieces the trainer composes, for any family: which params train, an optimizer that
leaves the rest untouched, a pre-trained model's params laid into a fine-tuning model, the
classification loss, and the adapter/optimizer-memory report. LoRA itself is a parameter
transform (foundation/lora.py).

  mask = finetune.trainable_mask(params, config)         # bools, the params' tree
  optimizer = finetune.freeze_untrained(optim.make_optimizer(config), config)
  params, report = finetune.overlay_pretrained(init_params, pretrained_params, config)
  sums = finetune.classify_loss_sums(model, params, batch)   # config.model.num_classes > 0
  finetune.store_labels(config, train_iter, workdir, write, say)  # WORKDIR/labels.json

What trains (`is_trainable`): with `trainable` set (comma-separated regexes searched in each
param's path, 'head/' for a linear probe), only the params it matches; with LoRA (lora.rank > 0)
the adapters, plus a classifier's head when `trainable` is empty; otherwise every param (full
fine-tuning). Frozen params get no update at all -- not even weight decay -- and no Adam moments:
`freeze_untrained` runs the optimizer on the trainable subtree alone, so its state holds moments
for the trainable leaves only.
"""

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from foundation import config as config_lib
from foundation import lora

# A new classifier's head, by family: the decoder's 'classifier', the encoders' 'head'.
HEADS = ("classifier", "head")
# Moments Adam keeps per trainable param (mu and nu), each in the param's dtype.
ADAM_MOMENTS = 2


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def trainable_patterns(config) -> list:
  """The compiled regexes of `trainable` (empty: no restriction); a bad one is a ConfigError."""
  return config_lib.patterns(config, "trainable")


def has_frozen_params(config) -> bool:
  """Whether some params do not train (LoRA's frozen base, or `trainable` naming a subset)."""
  return lora.enabled(config) or bool(trainable_patterns(config))


def _rule(config):
  """path -> whether that param trains under `config` (see the module docstring)."""
  patterns, adapted = trainable_patterns(config), lora.enabled(config)

  def trains(path) -> bool:
    names = _names(path) if not isinstance(path, str) else path.split("/")
    if adapted and lora.is_adapter(names):
      return True
    if patterns:
      key = "/".join(names)
      return any(p.search(key) for p in patterns)
    return not adapted or any(n in HEADS for n in names)
  return trains


def is_trainable(path, config) -> bool:
  """Whether the param at `path` (a tree path or 'a/b/c') trains under the run config."""
  return _rule(config)(path)


def trainable_mask(params: Any, config) -> Any:
  """A tree like `params` (arrays, shapes or nn.Partitioned boxes) of bools: True where the param
  trains under the run config."""
  trains = _rule(config)
  return jax.tree_util.tree_map_with_path(lambda path, _: trains(path), params)


def partition(tree: dict, config) -> tuple[dict, dict]:
  """(trainable, frozen): the nested dicts of `tree` (params, grads, or boxed params) split by
  `is_trainable`; each keeps only its own leaves (empty dicts dropped). `combine` undoes it."""
  trains = _rule(config)

  def split(node, path):
    if not isinstance(node, Mapping):
      return (node, None) if trains(path) else (None, node)
    parts = {k: split(v, (*path, k)) for k, v in node.items()}
    return tuple({k: p[i] for k, p in parts.items() if not _is_empty(p[i])} for i in (0, 1))
  return split(tree, ())


def _is_empty(node) -> bool:
  return node is None or (isinstance(node, Mapping) and not node)


def combine(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (`partition`'s two halves)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = combine(out[k], v) if k in out else v
  return out


def freeze_untrained(optimizer: optax.GradientTransformation,
                     config) -> optax.GradientTransformation:
  """`optimizer` over the trainable params only; frozen ones get zero updates and no state.

  The inner optimizer sees the trainable subtree alone (`partition`): its state (Adam's moments)
  exists only for those leaves, clipping measures only their gradients, and weight decay never
  touches a frozen param. Plain nested dicts throughout (no optax MaskedNode), so the state's
  shardings come from the params' logical names like any other. With nothing frozen (full
  fine-tuning) the optimizer is returned as is: the pre-training state layout.
  """
  if not has_frozen_params(config):
    return optimizer

  def init(params):
    return optimizer.init(partition(params, config)[0])

  def update(updates, state, params=None):
    trainable, frozen = partition(updates, config)
    inner_params = None if params is None else partition(params, config)[0]
    trainable, state = optimizer.update(trainable, state, inner_params)
    return combine(trainable, jax.tree.map(jnp.zeros_like, frozen)), state

  return optax.GradientTransformation(init, update)


def masked_grads(grads: Any, mask: Any) -> Any:
  """Gradients with the frozen leaves zeroed (for a grad-norm metric over what trains)."""
  return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)


# ---------------------------------------------------------------- pre-trained params

def _is_new(path) -> bool:
  """Params a fine-tuning model has that a pre-trained model does not: adapters, a new head."""
  names = _names(path)
  return lora.is_adapter(names) or any(n in HEADS for n in names)


def expected_difference(key: str, config) -> bool:
  """Whether a param named `key` ('a/b/c') may be in a pre-trained checkpoint and not in this
  model, or the reverse, when fine-tuning starts from it (init_from): adapters and a classifier
  head are new, and a classifier has no LM output layer."""
  names = key.split("/")
  if lora.is_adapter(names) or any(n in HEADS for n in names):
    return True
  return config.model.get("num_classes", 0) > 0 and names[0] == "output"


def overlay_pretrained(init_params: Any, pretrained: Any, config) -> tuple[Any, dict]:
  """`init_params` with every leaf the pre-trained LM has replaced by the pre-trained value.

  Adapters and a classifier head keep their init; pre-trained leaves the model lacks (a
  classifier drops the vocabulary output) are ignored. Returns (params, report) with report
  {'loaded', 'new', 'ignored': lists of 'a/b/c' paths}. Raises ValueError naming the param when
  shapes differ or a base param is missing (another model size or layout).
  """
  flat_pre = {"/".join(_names(p)): v for p, v in jax.tree_util.tree_leaves_with_path(pretrained)}
  report = {"loaded": [], "new": [], "ignored": []}

  def take(path, leaf):
    name = "/".join(_names(path))
    if name in flat_pre:
      value = flat_pre[name]
      if tuple(value.shape) != tuple(leaf.shape):
        raise ValueError(f"param {name}: the pre-trained checkpoint has shape {tuple(value.shape)},"
                         f" this model {tuple(leaf.shape)}; fine-tune with the checkpoint's "
                         f"model.* sizes (and model.scan_layers)")
      report["loaded"].append(name)
      return jnp.asarray(value, leaf.dtype) if hasattr(leaf, "dtype") else value
    if not _is_new(path):
      raise ValueError(f"param {name} is not in the pre-trained checkpoint (it has "
                       f"{sorted(flat_pre)[:8]}...): is it the same model size and layout?")
    report["new"].append(name)
    return leaf

  params = jax.tree_util.tree_map_with_path(take, init_params)
  report["ignored"] = sorted(set(flat_pre) - set(report["loaded"]))
  return params, report


# ---------------------------------------------------------------- classification

def classify_loss_sums(model, params: dict, batch: dict) -> dict:
  """Sums over the rows with label_mask 1 (jit-able): {'ce_sum': cross-entropy, 'correct':
  argmax hits, 'count': rows}, all float32 scalars. Sums, so hosts and batches add up exactly.

  batch: int32 inputs, positions, segment_ids [B, L]; labels, last_index, label_mask [B].
  """
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], last_index=batch["last_index"])
  logits = logits.astype(jnp.float32)
  labels = batch["labels"]
  ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  mask = batch["label_mask"] > 0
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  # where, not multiply: a padding row's logits must not leak a NaN into the sums.
  return {"ce_sum": jnp.where(mask, ce, 0.0).sum(), "correct": jnp.where(mask, hit, 0.0).sum(),
          "count": mask.sum().astype(jnp.float32)}


def classify_logits(model, params: dict, batch: dict) -> jax.Array:
  """float32 [B, num_classes]: the head's logits at each row's `last_index` (jit-able)."""
  return model.apply({"params": params}, batch["inputs"], batch["positions"],
                     batch["segment_ids"], last_index=batch["last_index"]).astype(jnp.float32)


def store_labels(config, train_iter, workdir: str, write: bool, say) -> None:
  """A classifier's label names (index = id) kept in WORKDIR/labels.json and printed once; other
  tasks: nothing. Raises ValueError when checkpoints of other labels are there."""
  if config.get("task") != "classify":
    return
  from foundation.data import classify  # pylint: disable=g-import-not-at-top
  names = train_iter.description()["labels"]
  classify.store_labels(names, workdir, write)
  say(f"{classify.describe_labels(names)} (kept in {os.path.join(workdir, classify.LABELS_FILE)})")


# ---------------------------------------------------------------- the report

def count_params(tree: Any, mask: Any = None) -> int:
  """Scalars in `tree` (arrays or shapes); with `mask`, only where it is True."""
  leaves = jax.tree.leaves(tree)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  return sum(math.prod(x.shape) for x, m in zip(leaves, keep) if m)


def tree_bytes(tree: Any, mask: Any = None) -> int:
  """Bytes of the arrays (or shapes) in `tree`; with `mask`, only where it is True."""
  leaves = jax.tree.leaves(tree)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x, m in zip(leaves, keep) if m)


def trainable_report(params: Any, mask: Any) -> dict:
  """Param counts and Adam's state memory (mu and nu per trainable param, in the params' dtype),
  for what trains and for full fine-tuning."""
  return {"params": count_params(params), "trainable": count_params(params, mask),
          "adam_state_bytes": ADAM_MOMENTS * tree_bytes(params, mask),
          "full_adam_state_bytes": ADAM_MOMENTS * tree_bytes(params)}


def describe(report: dict) -> str:
  """One console line from `trainable_report`."""
  share = report["trainable"] / max(report["params"], 1)
  return (f"trainable: {report['trainable']:,} of {report['params']:,} params ({share:.2%}); "
          f"Adam state {_size(report['adam_state_bytes'])} (full fine-tuning: "
          f"{_size(report['full_adam_state_bytes'])})")


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"
