"""Contrastive image-text tasks on the two-tower family: 'siglip' (the sigmoid pairwise loss, Zhai
et al. 2023) and 'clip' (the softmax contrastive loss, Radford et al. 2021), both over the GLOBAL
batch; their input 'image_text' (foundation/data/image_text_input.py).

How the negatives reach each device. The step is one jit over the mesh: each device holds its rows
of the batch (images and texts sharded by 'batch' over data x fsdp) and computes its rows'
embeddings. `pair_logits` then asks for the text embeddings replicated (a logical constraint
with no mesh axis): XLA all-gathers them, B x E floats per device, and each device makes its
[B / n, B] block of the logits matrix -- its images against every text of the global batch. The
sigmoid loss is a sum over every entry, so each device sums its block and one all-reduce of a
scalar adds them. The softmax loss needs each row's log-sum-exp (local: the device holds whole
rows) and each column's (across devices: an all-reduce of two B-vectors, the max and the sum).
In the backward pass the gathered embeddings' gradients are reduce-scattered back to their rows.
Cost per step, n devices, batch B, embedding E: communication O(B x E) (the gather) + O(B) (the
column reductions); memory O(B / n x B) floats for the logits block (B = 32k on 256 devices:
16 MB per device) and O(B x E) for the gathered embeddings. No device ever holds the full B x B
matrix unless the batch is not split.

Pairs whose texts are identical (the same token ids) count as positives too: a drawn or templated
set repeats captions, and calling "two red circles on the left" a negative of another image with
that caption would teach noise. With distinct texts both losses are exactly the papers'.

  sigmoid: loss_sum = - sum_ij log sigmoid(z_ij * (exp(t) <x_i, y_j> + b)),  z_ij = +1 / -1
  softmax: loss_sum = sum_i (CE_image->text_i + CE_text->image_i) / 2,  scale exp(t)
Both are divided by the number of real rows (label_mask 1): the per-image loss of big_vision.
Padding rows are neither rows nor negatives.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from foundation import registry
from foundation.tasks import base

IMAGE = ("batch", "height", "width", "channels")
TOKENS = ("batch", "length")
ROWS = ("batch",)
NEG = -1e9  # a masked logit: exp() is 0, and no inf - inf


def pair_logits(image_emb, text_emb, scale, bias):
  """float32 [B, B]: image i against text j. Each device computes its image rows against every
  text (the texts all-gathered, see the module docstring)."""
  texts = nn.with_logical_constraint(text_emb, (None, None))   # replicated: the all-gather
  images = nn.with_logical_constraint(image_emb, ("batch", None))
  logits = jnp.einsum("ie,je->ij", images, texts, preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits * scale + bias, ("batch", None))


def positives(text, text_segments):
  """bool [B, B]: text i and text j are the same token ids (the diagonal, and repeats)."""
  ids = jnp.where(text_segments > 0, text, -1)
  ids = nn.with_logical_constraint(ids, (None, None))
  return nn.with_logical_constraint((ids[:, None, :] == ids[None, :, :]).all(-1), ("batch", None))


def sigmoid_loss_sum(logits, positive, valid):
  """- sum over valid pairs of log sigmoid(+-logit): SigLIP's loss before dividing by B."""
  sign = jnp.where(positive, 1.0, -1.0)
  pair = valid[:, None] & valid[None, :]
  return jnp.where(pair, -jax.nn.log_sigmoid(sign * logits), 0.0).sum()


def softmax_loss_sum(logits, positive, valid):
  """sum over valid rows of (CE image->text + CE text->image) / 2; the target of a row is any of
  its positives (-log of their total probability; one positive: the usual cross-entropy)."""
  pair = valid[:, None] & valid[None, :]
  masked = jnp.where(pair, logits, NEG)
  hits = jnp.where(pair & positive, logits, NEG)
  image_to_text = jax.nn.logsumexp(masked, axis=1) - jax.nn.logsumexp(hits, axis=1)
  text_to_image = jax.nn.logsumexp(masked, axis=0) - jax.nn.logsumexp(hits, axis=0)
  return jnp.where(valid, (image_to_text + text_to_image) / 2, 0.0).sum()


class _Contrastive(base.PerRow, base.Task):
  """What both losses share: the batch, checks, eval sums (loss and in-batch image->text top-1)."""
  input = "image_text"
  loss_kind = ""

  def check(self, config) -> None:
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    image_text_input.check_config(config)
    vit.check(config.model.image, config.data.image_size)
    if config.data.text_len > config.model.text.max_len:
      raise ValueError(f"data.text_len={config.data.text_len} is longer than the text tower "
                       f"allows: model.text.max_len={config.model.text.max_len}")
    if config.grad_accum > 1:
      raise ValueError(f"grad_accum={config.grad_accum}: the {config.task} loss takes its "
                       f"negatives from the whole batch, and micro-batches would each see only "
                       f"theirs (a different loss); use grad_accum=1")

  def split_sizes(self, config) -> dict[str, str]:
    return {"length": "data.text_len"}

  def tokenizer(self, check_vocab: bool = True):
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    tokenizer = image_text_input.make_tokenizer(self.config)
    vocab = self.config.model.text.vocab_size
    if check_vocab and tokenizer.vocab_size > vocab:
      raise ValueError(f"data.tokenizer={self.config.data.tokenizer!r} has "
                       f"{tokenizer.vocab_size} ids but model.text.vocab_size={vocab}")
    return tokenizer

  def batch_spec(self) -> dict[str, base.Field]:
    d = self.config.data
    return {"image": base.Field((d.image_size, d.image_size, d.channels), "float32", IMAGE),
            "text": base.Field((d.text_len,), "int32", TOKENS),
            "text_segments": base.Field((d.text_len,), "int32", TOKENS, fill=1),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}

  def model_args(self, batch: dict) -> tuple:
    return batch["image"], batch["text"], batch["text_segments"]

  def logits(self, model, params, batch):
    image_emb, text_emb, scale, bias = model.apply({"params": params}, *self.model_args(batch))
    return pair_logits(image_emb, text_emb, scale, bias)

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    logits = self.logits(model, params, batch)
    positive = positives(batch["text"], batch["text_segments"])
    valid = batch["label_mask"] > 0
    loss = (sigmoid_loss_sum if self.loss_kind == "sigmoid" else softmax_loss_sum)(
        logits, positive, valid)
    # In-batch image->text top-1: the best text of a real row is one of its positives.
    best = jnp.argmax(jnp.where(valid[None, :], logits, NEG), axis=1)
    hit = jnp.take_along_axis(positive, best[:, None], axis=1)[:, 0]
    return {"loss_sum": loss, "correct": jnp.where(valid, hit, False).sum().astype(jnp.float32)}

  def flops_per_example(self, model) -> float:
    from foundation.models import two_tower  # pylint: disable=g-import-not-at-top
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    d, cfg = self.config.data, model.cfg
    return (vit.flops_per_example(cfg.image, d.image_size, d.channels)
            + two_tower.text_flops_per_example(cfg.text, d.text_len)
            + 6 * cfg.embed_dim * (cfg.image.width * cfg.image_proj
                                   + cfg.text.width * cfg.text_proj))


@registry.register("task", "siglip")
class SigmoidContrastive(_Contrastive):
  """SigLIP's sigmoid pairwise loss over the global batch."""
  loss_kind = "sigmoid"


@registry.register("task", "clip")
class SoftmaxContrastive(_Contrastive):
  """CLIP's softmax contrastive loss (both directions) over the global batch."""
  loss_kind = "softmax"


@registry.register("input", "image_text")
def image_text_input_(config, index: int, count: int, with_eval: bool):
  from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
  return (image_text_input.make_train_iterator(config, index, count),
          image_text_input.eval_batches(config, index, count) if with_eval else [])
