"""Text tasks on the decoder family: 'lm' (next-token pre-training), 'sft' (the same loss on the
answers of chats or prompt/response pairs) and 'classify' (one class per sequence).

Their inputs: 'text' (packed documents, foundation/data/pipeline.py), 'sft' (foundation/data/
sft.py) and 'classify' (foundation/data/classify.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from foundation import registry
from foundation.models import transformer
from foundation.tasks import base

TOKENS = ("batch", "length")
ROWS = ("batch",)


# ---------------------------------------------------------------- the loss

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


def next_token_sums(model, params, batch, chunk: int = 0):
  """(ce_sum, z_sum) of the model on one batch.

  chunk > 0: the logits are made `chunk` positions at a time inside a rematerialised scan, so the
  float32 [batch, seq, vocab] tensor never exists whole, forward or backward; only [batch, chunk,
  vocab] does. Same numbers, less memory, a second output matmul in the backward pass.
  """
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  if not chunk or chunk >= batch["inputs"].shape[1]:
    logits = model.apply({"params": params}, *args)
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
  hidden = model.apply({"params": params}, *args, return_hidden=True)

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


# ---------------------------------------------------------------- the tasks

class _TokenTask(base.Task):
  """What the text tasks share: rows of `seq_len` tokens with positions and segment ids."""
  unit = "tokens"

  def units_per_example(self) -> int:
    return self.config.seq_len

  def tokenizer(self, check_vocab: bool = True):
    from foundation import data  # pylint: disable=g-import-not-at-top
    tokenizer = data.make_tokenizer(self.config.data.tokenizer)
    if check_vocab:
      data.check_vocab_size(tokenizer, self.config)
    return tokenizer

  def check(self, config) -> None:
    if config.seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {config.seq_len}")
    if config.seq_len > config.model.max_seq_len:
      raise ValueError(f"seq_len={config.seq_len} is longer than the model allows: "
                       f"model.max_seq_len={config.model.max_seq_len}")

  def split_sizes(self, config) -> dict[str, str]:
    return {"length": "seq_len"}

  def model_args(self, batch: dict) -> tuple:
    return batch["inputs"], batch["positions"], batch["segment_ids"]

  def flops_per_example(self, model) -> float:
    return transformer.flops_per_token(model.cfg, self.config.seq_len) * self.config.seq_len


@registry.register("task", "lm")
class NextToken(_TokenTask):
  """Next-token prediction over packed documents: cross-entropy (plus optim.z_loss x log(Z)^2)
  per target token with loss_mask 1."""
  input = "text"
  generates = True

  def check(self, config) -> None:
    super().check(config)
    chunk = config.model.get("logits_chunk", 0)
    if chunk < 0 or (chunk and config.seq_len % chunk):
      raise ValueError(f"model.logits_chunk={chunk} must be 0 (off) or divide "
                       f"seq_len={config.seq_len}")
    if config.model.get("num_classes", 0):
      raise ValueError(f"task={config.task!r} with model.num_classes="
                       f"{config.model.num_classes}: a classifier needs task='classify', a "
                       f"language model model.num_classes=0")

  def batch_spec(self) -> dict[str, base.Field]:
    row = (self.config.seq_len,)
    return {"inputs": base.Field(row, "int32", TOKENS),
            "targets": base.Field(row, "int32", TOKENS),
            "segment_ids": base.Field(row, "int32", TOKENS, fill=1),
            "positions": base.Field(row, "int32", TOKENS),
            "loss_mask": base.Field(row, "int32", TOKENS, fill=1)}

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    ce, z = next_token_sums(model, params, batch, self.config.model.get("logits_chunk", 0))
    return {"loss_sum": ce, "z_sum": z}

  def objective(self, sums: dict):
    return sums["loss_sum"] + self.config.optim.z_loss * sums["z_sum"]

  def count(self, batch: dict):
    return jnp.maximum(batch["loss_mask"].sum().astype(jnp.float32), 1.0)

  def count_unclamped(self, batch: dict):
    return batch["loss_mask"].sum()

  def train_metrics(self, sums: dict, count) -> dict:
    metrics = {"loss": sums["loss_sum"] / count}
    if self.config.optim.z_loss:
      metrics["z_loss"] = self.config.optim.z_loss * sums["z_sum"] / count
    return metrics

  def eval_metrics(self, sums: dict) -> dict:
    loss = super().eval_metrics(sums)["loss"]
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


@registry.register("task", "sft")
class SupervisedFineTuning(NextToken):
  """The next-token loss on the answer tokens of chats or prompt/response pairs (the input's
  loss_mask marks them); foundation/data/sft.py."""
  input = "sft"


@registry.register("task", "classify")
class ClassifySequence(base.PerRow, _TokenTask):
  """One class per sequence from the hidden state of its last token (model.num_classes > 0):
  cross-entropy and accuracy per row with label_mask 1."""
  input = "classify"

  def check(self, config) -> None:
    super().check(config)
    classes = config.model.get("num_classes", 0)
    if classes <= 0:
      raise ValueError(f"task='classify' with model.num_classes={classes}: a classifier needs "
                       f"model.num_classes > 0")
    if config.get("evaluate") and config.evaluate.every > 0:
      raise ValueError(f"evaluate.every={config.evaluate.every}: the task evaluators score a "
                       f"language model's tokens, and task='classify' trains a classifier; its "
                       f"accuracy is eval.* (set evaluate.every=0)")
    if config.grad_accum > 1:
      raise ValueError(f"grad_accum={config.grad_accum}: a classifier trains without gradient "
                       f"accumulation; use grad_accum=1")

  def batch_spec(self) -> dict[str, base.Field]:
    row = (self.config.seq_len,)
    return {"inputs": base.Field(row, "int32", TOKENS),
            "segment_ids": base.Field(row, "int32", TOKENS, fill=1),
            "positions": base.Field(row, "int32", TOKENS),
            "labels": base.Field((), "int32", ROWS),
            "last_index": base.Field((), "int32", ROWS),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    from foundation import finetune  # pylint: disable=g-import-not-at-top
    sums = finetune.classify_loss_sums(model, params, batch)
    return {"loss_sum": sums["ce_sum"], "correct": sums["correct"]}


# ---------------------------------------------------------------- their inputs
# input(config, process_index, process_count, with_eval) -> (train iterator, eval batches)

@registry.register("input", "text")
def text_input(config, index: int, count: int, with_eval: bool):
  from foundation import data  # pylint: disable=g-import-not-at-top
  return (data.make_train_iterator(config, index, count),
          data.make_eval_batches(config, index, count) if with_eval else [])


@registry.register("input", "sft")
def sft_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import sft  # pylint: disable=g-import-not-at-top
  return (sft.make_sft_iterator(config, index, count),
          sft.make_sft_eval_batches(config, index, count) if with_eval else [])


@registry.register("input", "classify")
def classify_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import classify  # pylint: disable=g-import-not-at-top
  examples = classify.ClassifyData(config)
  return (classify.make_classify_iterator(config, index, count, examples),
          classify.make_classify_eval_batches(config, index, count, examples) if with_eval else [])
