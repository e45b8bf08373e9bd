"""The audio family: shapes and logical names of both front ends (AST patches, Whisper's conv
stem), the MAE and the classifier sharing the encoder's params (so init_from transfers), the
MAE hiding the patches of highest noise, patch order, and config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import audio as audio_configs
from configs import common
from foundation.models import audio

FRAMES, MEL = 64, 32


def make_cfg(size="test", **overrides) -> audio.AudioConfig:
  return audio.AudioConfig.from_config(ml_collections.ConfigDict(
      audio.model_config(size, **overrides)))


def names_of(params) -> dict:
  return jax.tree.map(lambda p: p.names, params, is_leaf=lambda p: isinstance(p, nn.Partitioned))


def spectrograms(batch=3):
  return jnp.asarray(np.random.default_rng(0).normal(size=(batch, FRAMES, MEL)), jnp.float32)


@pytest.mark.parametrize("frontend, pool, tokens", [("patch", "mean", 32), ("patch", "cls", 33),
                                                     ("conv", "mean", 32)])
def test_shapes_and_logical_names(frontend, pool, tokens):
  cfg = make_cfg(frontend=frontend, pool=pool, num_classes=7)
  x = spectrograms()
  variables = jax.eval_shape(audio.AudioTransformer(cfg).init, jax.random.key(0), x)
  assert jax.eval_shape(audio.AudioTransformer(cfg).apply, variables, x).shape == (3, 7)
  encoder = {"params": variables["params"]["encoder"]}
  out = jax.eval_shape(audio.Encoder(cfg).apply, encoder, x)
  assert out.shape == (3, tokens, cfg.width) == (3, audio.num_tokens(cfg, FRAMES, MEL), 32)
  names = names_of(variables["params"])
  layer = names["encoder"]["layers"]
  assert layer["attn"]["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
  assert layer["mlp"]["wi"]["kernel"] == ("layers", "embed", "mlp")
  if frontend == "patch":
    assert names["encoder"]["embedding"]["kernel"] == ("frames", "mel", "embed")
  else:
    assert names["encoder"]["conv1"]["kernel"] == (None, "mel", "embed")
  rules = {n for n, _ in common.mesh_config().rules} | {n for n, _ in audio.AUDIO_RULES}
  used = {n for leaf in jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
          for n in leaf if n is not None}
  assert used <= rules, used - rules


def test_the_mae_and_the_classifier_share_the_encoder():
  cfg = make_cfg()
  x, noise = spectrograms(), jnp.zeros((3, 32))
  mae = jax.eval_shape(audio.AudioMAE(cfg).init, jax.random.key(0), x, noise)["params"]
  cls = jax.eval_shape(audio.AudioTransformer(make_cfg(num_classes=5)).init, jax.random.key(0),
                       x)["params"]
  assert set(mae) == {"encoder", "decoder"} and set(cls) == {"encoder", "head"}
  shapes = lambda tree: jax.tree.map(lambda p: p.value.shape, tree,
                                     is_leaf=lambda p: isinstance(p, nn.Partitioned))
  assert shapes(mae["encoder"]) == shapes(cls["encoder"])


def test_the_mae_hides_the_patches_of_highest_noise():
  cfg = make_cfg(norm_target=True)
  x = spectrograms(2)
  noise = jnp.asarray(np.random.default_rng(1).random((2, 32)), jnp.float32)
  model = audio.AudioMAE(cfg)
  params = jax.jit(model.init)(jax.random.key(0), x, noise)
  predicted, target, hidden = jax.jit(model.apply)(params, x, noise)
  _, raw, _ = audio.AudioMAE(make_cfg(norm_target=False)).apply(params, x, noise)
  visible = audio.num_visible(cfg, 32)
  assert visible == 6 and predicted.shape == target.shape == (2, 32, 64)
  ranks = np.argsort(np.argsort(np.asarray(noise), axis=1), axis=1)
  np.testing.assert_array_equal(np.asarray(hidden), (ranks >= visible).astype(np.float32))
  patches = np.asarray(audio.patchify(cfg, x)).reshape(2, 32, 64)
  want = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True)
                                                              + 1e-6)
  np.testing.assert_allclose(np.asarray(target), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(raw), patches)  # norm_target=False: the values


def test_patches_are_time_major():
  cfg = make_cfg()
  x = np.arange(FRAMES * MEL, dtype=np.float32).reshape(1, FRAMES, MEL)
  patches = np.asarray(audio.patchify(cfg, jnp.asarray(x)))
  gf = MEL // 8
  for i, j in ((0, 0), (0, 3), (2, 1), (7, 3)):
    np.testing.assert_array_equal(patches[0, i * gf + j], x[0, i * 8:i * 8 + 8, j * 8:j * 8 + 8])


def test_sizes_and_config_errors():
  for size in audio.SIZES:
    config = audio_configs.get_config(f"size={size}")
    audio.check(config.model, 64 if size in ("test", "tiny") else 128, 32 if size in (
        "test", "tiny") else 128)
  with pytest.raises(ValueError, match="64 frames .* not divisible by model.patch_time=12"):
    audio.check(ml_collections.ConfigDict(audio.model_config("test", patch_time=12)), 64, 32)
  with pytest.raises(ValueError, match="model.frontend='mel' is unknown"):
    make_cfg(frontend="mel")
  with pytest.raises(ValueError, match="preset='mea' is unknown"):
    audio_configs.get_config("preset=mea")
