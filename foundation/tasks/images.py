"""Image tasks: 'image_classify' (one label per image, top-1 accuracy) on the ViT family.

Its input, 'images', is foundation/data/image_input.py: the embedded drawn shapes, a TFDS dataset
by name or a folder with one sub-folder per class, preprocessed by the image_ops chains of
data.pp_train / data.pp_eval.
"""

import jax
import jax.numpy as jnp

from foundation import registry
from foundation.tasks import base

IMAGE = ("batch", "height", "width", "channels")
ROWS = ("batch",)


@registry.register("task", "image_classify")
class ClassifyImage(base.PerRow, base.Task):
  """Cross-entropy over model.num_classes per image with label_mask 1; eval: loss and top-1."""
  input = "images"
  unit = "patches"

  def _vit(self):
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    return vit

  def check(self, config) -> None:
    mixup = config.data.get("mixup", 0.0)
    if mixup < 0:
      raise ValueError(f"data.mixup={mixup} must be >= 0 (0: off; big_vision uses 0.1-0.5)")
    classes = config.model.get("num_classes", 0)
    if classes <= 0:
      raise ValueError(f"task='image_classify' with model.num_classes={classes}: the head needs "
                       f"model.num_classes > 0")
    if config.data.image_size <= 0 or config.data.channels <= 0:
      raise ValueError(f"data.image_size={config.data.image_size} and data.channels="
                       f"{config.data.channels} must be positive")
    self._vit().check(config.model, config.data.image_size)

  def batch_spec(self) -> dict[str, base.Field]:
    d = self.config.data
    spec = {"image": base.Field((d.image_size, d.image_size, d.channels), "float32", IMAGE),
            "label": base.Field((), "int32", ROWS),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}
    if d.get("mixup", 0.0) > 0:  # mixup's soft labels (one-hot in eval batches)
      spec["soft_label"] = base.Field((self.config.model.num_classes,), "float32", (*ROWS, None))
    return spec

  def model_args(self, batch: dict) -> tuple:
    return (batch["image"],)

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    logits = model.apply({"params": params}, batch["image"], train=bool(rngs),
                         rngs=rngs or {}).astype(jnp.float32)
    labels = batch["label"]
    if "soft_label" in batch:  # mixup: cross-entropy against the mixed label distribution
      ce = jax.nn.logsumexp(logits, axis=-1) - (batch["soft_label"] * logits).sum(-1)
    else:
      ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None],
                                                                   -1)[:, 0]
    mask = batch["label_mask"] > 0
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    # where, not multiply: a padding row's logits must not leak a NaN into the sums
    return {"loss_sum": jnp.where(mask, ce, 0.0).sum(),
            "correct": jnp.where(mask, hit, 0.0).sum()}

  def flops_per_example(self, model) -> float:
    d = self.config.data
    return self._vit().flops_per_example(model.cfg, d.image_size, d.channels)

  def units_per_example(self) -> int:
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    cfg = vit.ViTConfig.from_config(self.config.model)
    return (self.config.data.image_size // cfg.patch_size) ** 2


@registry.register("input", "images")
def image_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import image_input as images  # pylint: disable=g-import-not-at-top
  return (images.make_train_iterator(config, index, count),
          images.eval_batches(config, index, count) if with_eval else [])
