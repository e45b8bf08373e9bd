"""Audio tasks on the 'audio' family: 'audio_classify' (one label per clip, top-1 accuracy) and
'audio_mae' (masked-spectrogram-patch modelling: mask most patches, reconstruct them).

Their inputs, 'audio' and 'audio_mae', are foundation/data/audio_input.py: the embedded sounds,
a folder of class folders of WAV files or a TFDS dataset by name, through the audio_ops chains
of data.pp_train / data.pp_eval; 'audio_mae' adds each clip's patch noise (which patches hide),
drawn in the input pipeline from the example's seed, so a resumed run hides the same patches.
"""

import jax
import jax.numpy as jnp

from foundation import registry
from foundation.models import audio as audio_models  # registers the 'audio' family
from foundation.tasks import base

SPECTROGRAM = ("batch", "frames", "mel")
ROWS = ("batch",)


def _audio():
  return audio_models


def _shape(config) -> tuple[int, int]:
  """(frames, mel_bins) of the front end's spectrograms."""
  from foundation.data import audio_input  # pylint: disable=g-import-not-at-top
  frontend = audio_input.frontend(config)
  return frontend.frames, frontend.mel_bins


class _AudioTask(base.Task):
  unit = "tokens"

  def check(self, config) -> None:
    from foundation.data import audio_input  # pylint: disable=g-import-not-at-top
    audio_input.frontend(config).check()
    _audio().check(config.model, *_shape(config))

  def model_args(self, batch: dict) -> tuple:
    return (batch["spectrogram"],)

  def spectrogram_field(self) -> base.Field:
    return base.Field(_shape(self.config), "float32", SPECTROGRAM)

  def units_per_example(self) -> int:
    audio = _audio()
    return audio.num_tokens(audio.AudioConfig.from_config(self.config.model),
                            *_shape(self.config))


@registry.register("task", "audio_classify")
class ClassifyAudio(base.PerRow, _AudioTask):
  """Cross-entropy over model.num_classes per clip with label_mask 1; eval: loss and top-1."""
  input = "audio"

  def check(self, config) -> None:
    classes = config.model.get("num_classes", 0)
    if classes <= 0:
      raise ValueError(f"task='audio_classify' with model.num_classes={classes}: the head needs "
                       f"model.num_classes > 0")
    super().check(config)

  def batch_spec(self) -> dict[str, base.Field]:
    return {"spectrogram": self.spectrogram_field(),
            "label": base.Field((), "int32", ROWS),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    logits = model.apply({"params": params}, batch["spectrogram"], train=bool(rngs),
                         rngs=rngs or {}).astype(jnp.float32)
    labels = batch["label"]
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    mask = batch["label_mask"] > 0
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    # where, not multiply: a padding row's logits must not leak a NaN into the sums
    return {"loss_sum": jnp.where(mask, ce, 0.0).sum(),
            "correct": jnp.where(mask, hit, 0.0).sum()}

  def flops_per_example(self, model) -> float:
    return _audio().flops_per_example(model.cfg, *_shape(self.config))


@registry.register("task", "audio_mae")
class MaskedAudio(_AudioTask):
  """Mean squared error of the reconstructed hidden patches (each patch's values normalised
  with model.norm_target), as sums over the hidden patches of real rows; count: those patches."""
  input = "audio_mae"

  def check(self, config) -> None:
    super().check(config)
    m = config.model
    if m.frontend != "patch" or m.pool != "mean":
      raise ValueError(f"task='audio_mae' needs model.frontend='patch' and model.pool='mean' "
                       f"(got {m.frontend!r}, {m.pool!r})")

  def patches(self) -> int:
    audio = _audio()
    gt, gf = audio.grid(audio.AudioConfig.from_config(self.config.model), *_shape(self.config))
    return gt * gf

  def hidden_per_row(self) -> int:
    audio = _audio()
    cfg = audio.AudioConfig.from_config(self.config.model)
    return self.patches() - audio.num_visible(cfg, self.patches())

  def batch_spec(self) -> dict[str, base.Field]:
    return {"spectrogram": self.spectrogram_field(),
            "noise": base.Field((self.patches(),), "float32", ("batch", "patches")),
            "label": base.Field((), "int32", ROWS),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}

  def model_args(self, batch: dict) -> tuple:
    return (batch["spectrogram"], batch["noise"])

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    predicted, target, hidden = model.apply(
        {"params": params}, batch["spectrogram"], batch["noise"], train=bool(rngs),
        rngs=rngs or {})
    per_patch = jnp.mean((predicted - target) ** 2, axis=-1)           # [B, N]
    weight = hidden * (batch["label_mask"] > 0)[:, None]
    return {"loss_sum": jnp.where(weight > 0, per_patch, 0.0).sum()}

  def count_unclamped(self, batch: dict):
    return (batch["label_mask"] > 0).sum().astype(jnp.float32) * self.hidden_per_row()

  def count(self, batch: dict):
    return jnp.maximum(self.count_unclamped(batch), 1.0)

  def flops_per_example(self, model) -> float:
    return _audio().mae_flops_per_example(model.cfg, *_shape(self.config))


@registry.register("input", "audio")
def audio_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import audio_input as audio  # pylint: disable=g-import-not-at-top
  return (audio.make_train_iterator(config, index, count),
          audio.eval_batches(config, index, count) if with_eval else [])


@registry.register("input", "audio_mae")
def audio_mae_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import audio_input as audio  # pylint: disable=g-import-not-at-top
  noise = registry.get("task", "audio_mae")(config).patches()
  return (audio.make_train_iterator(config, index, count, noise),
          audio.eval_batches(config, index, count, noise) if with_eval else [])
