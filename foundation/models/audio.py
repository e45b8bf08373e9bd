"""Audio encoders over log-mel spectrograms (family 'audio'), and their masked-patch pre-training.

Two front ends into one pre-LN transformer encoder (the ViT's blocks, `vit.Block`: LayerNorm,
bidirectional attention, GELU MLP, over `layers.Dense`):

  'patch'  AST (Gong et al. 2021): the spectrogram [B, frames, mel] cut into non-overlapping
           patch_time x patch_freq patches (time-major), each a Dense to `width`, + learned
           position embeddings [+ a class token].
  'conv'   the Whisper encoder's stem (Radford et al. 2022): two 1-D convolutions over time with
           the mel bins as channels (kernel 3; stride 1, then 2), GELU after each, + sinusoidal
           position embeddings: frames / 2 tokens.

`AudioTransformer` pools the encoder's tokens ('mean' or 'cls') into a zero-initialised
`layers.ClassifierHead` (a linear probe trains only it: `config.trainable='^head/'`, the core's
trainable mask). `AudioMAE` is masked-spectrogram-patch modelling (Huang et al. 2022, Audio-MAE):
the encoder sees the patches whose noise is lowest (1 - mask_ratio of them), a small decoder
sees the encoded ones and a learned mask token at every hidden position, and predicts each
patch's (normalised) values. Both keep the encoder under the name 'encoder', so an MAE run's
encoder loads into a classifier with `init_from` (skipping 'head/.*' and 'decoder/.*').

Params carry the LM's logical names (`embed`, `heads`, `head_dim`, `mlp`, `layers`) and shard by
the same `config.mesh.rules`; the spectrogram's own axes are `frames` and `mel` (AUDIO_RULES:
replicated), the MAE's patch axis `patches`.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation import models
from foundation import registry
from foundation.models import layers
from foundation.models import transformer
from foundation.models import vit

Array = jax.Array

FRONTENDS = ("patch", "conv")
POOLS = ("mean", "cls")
SPECTROGRAM = ("batch", "frames", "mel")
AUDIO_RULES = (("frames", None), ("mel", None), ("patches", None))

# name: (width, depth, heads, mlp_dim), decoder (width, depth, heads, mlp_dim), patch side.
# S/B/L are the ViT's (AST is DeiT-B); the decoders follow Audio-MAE's (512 wide, 8 deep).
SIZES = {
    "test": ((32, 2, 2, 64), (32, 1, 2, 64), 8),
    "tiny": ((64, 4, 4, 128), (64, 2, 4, 128), 8),
    "S": ((384, 12, 6, 1536), (256, 4, 8, 1024), 16),
    "B": ((768, 12, 12, 3072), (512, 8, 16, 2048), 16),
    "L": ((1024, 24, 16, 4096), (512, 8, 16, 2048), 16),
}


@dataclasses.dataclass(frozen=True)
class AudioConfig(models.Dtypes):
  """The audio encoder's hyper-parameters (frozen: a static argument and a Module field). The
  attribute names the ViT's blocks read (width, num_heads, mlp_dim, ...) are the ViT's."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  frontend: str = "patch"          # 'patch' (AST) or 'conv' (Whisper's stem)
  patch_time: int = 16             # frames per patch ('patch')
  patch_freq: int = 16             # mel bins per patch ('patch')
  num_classes: int = 0             # 0: return the pooled features [B, width]
  pool: str = "mean"               # 'mean' or 'cls'
  decoder_width: int = 512         # the MAE decoder
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  mask_ratio: float = 0.8          # the MAE's share of hidden patches
  norm_target: bool = False        # MAE: each target patch normalised to mean 0, variance 1
  dropout: float = 0.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "xla"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} is not divisible by model.num_heads="
                       f"{self.num_heads}")
    if self.decoder_width % self.decoder_heads:
      raise ValueError(f"model.decoder_width={self.decoder_width} is not divisible by "
                       f"model.decoder_heads={self.decoder_heads}")
    if self.frontend not in FRONTENDS:
      raise ValueError(f"model.frontend={self.frontend!r} is unknown; use one of "
                       f"{', '.join(FRONTENDS)}")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is unknown; use one of {', '.join(POOLS)}")
    if self.num_classes < 0:
      raise ValueError(f"model.num_classes={self.num_classes} must be >= 0 (0: pooled features)")
    if not 0.0 < self.mask_ratio < 1.0:
      raise ValueError(f"model.mask_ratio={self.mask_ratio} must be in (0, 1)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
    if self.remat_policy not in ("none", *transformer.REMAT_POLICIES):
      raise ValueError(f"model.remat_policy={self.remat_policy!r} is unknown; use one of none, "
                       f"{', '.join(transformer.REMAT_POLICIES)}")

  @classmethod
  def from_config(cls, config: Any) -> "AudioConfig":
    return models.dataclass_from_config(cls, config)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def decoder(self) -> "AudioConfig":
    """The MAE decoder's blocks: the same kind, its own sizes."""
    return dataclasses.replace(self, width=self.decoder_width, depth=self.decoder_depth,
                               num_heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim)


def model_config(size: str, **overrides) -> dict:
  """The `config.model` fields of a SIZES entry (a plain dict; the config wraps it)."""
  if size not in SIZES:
    raise ValueError(f"audio size {size!r} is unknown; sizes: {', '.join(SIZES)}")
  (width, depth, heads, mlp), (dw, dd, dh, dm), patch = SIZES[size]
  fields = dict(family="audio", width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
                frontend="patch", patch_time=patch, patch_freq=patch, num_classes=0, pool="mean",
                decoder_width=dw, decoder_depth=dd, decoder_heads=dh,
                # norm_target False: on the embedded sounds, 600 MAE steps of tiny then gave a
                # linear probe of 0.83+ at 100 steps where normalised targets gave 0.72
                # (docs/audio.md); set it True for Audio-MAE's normalised-patch loss.
                decoder_mlp_dim=dm, mask_ratio=0.8, norm_target=False, dropout=0.0, norm_eps=1e-6,
                dtype="float32", param_dtype="float32", attention="xla", scan_layers=True,
                remat_policy="none")
  fields.update(overrides)
  return fields


def grid(cfg: AudioConfig, frames: int, mel_bins: int) -> tuple[int, int]:
  """('patch') patches along time and frequency."""
  return frames // cfg.patch_time, mel_bins // cfg.patch_freq


def num_tokens(cfg: AudioConfig, frames: int, mel_bins: int) -> int:
  """Tokens the encoder sees on a whole spectrogram (with the class token of pool='cls')."""
  if cfg.frontend == "conv":
    tokens = (frames + 1) // 2
  else:
    gt, gf = grid(cfg, frames, mel_bins)
    tokens = gt * gf
  return tokens + (cfg.pool == "cls")


def check(config_model: Any, frames: int, mel_bins: int) -> None:
  """ValueError naming the fields when `config.model` cannot run on [frames, mel_bins] inputs."""
  cfg = AudioConfig.from_config(config_model)
  if cfg.frontend == "patch":
    for what, size, field, patch in (("frames", frames, "patch_time", cfg.patch_time),
                                     ("mel bins", mel_bins, "patch_freq", cfg.patch_freq)):
      if patch < 1 or size % patch:
        raise ValueError(f"the spectrogram's {size} {what} (data settings) are not divisible by "
                         f"model.{field}={patch}")


def patchify(cfg: AudioConfig, x: Array) -> Array:
  """[B, T, M] -> [B, (T/pt)(M/pf), pt, pf], time-major."""
  b, t, m = x.shape
  pt, pf = cfg.patch_time, cfg.patch_freq
  if t % pt or m % pf:
    raise ValueError(f"spectrogram {t}x{m} is not divisible by model.patch_time={pt} x "
                     f"patch_freq={pf}")
  x = x.reshape(b, t // pt, pt, m // pf, pf).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, (t // pt) * (m // pf), pt, pf)


def sinusoids(length: int, width: int) -> Array:
  """Whisper's position embeddings: [length, width], sines then cosines, timescales 1..10^4."""
  increment = math.log(10_000) / (width // 2 - 1)
  scales = jnp.exp(-increment * jnp.arange(width // 2))
  angles = jnp.arange(length)[:, None] * scales[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def _conv(cfg: AudioConfig, x: Array, stride: int, names: tuple, name: str) -> Array:
  """A kernel-3 'same' 1-D convolution over time as one Dense over [B, T', 3, C] windows."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
  length = (x.shape[1] + stride - 1) // stride
  windows = jnp.stack([padded[:, k:k + stride * length:stride] for k in range(3)], axis=2)
  return layers.Dense(cfg, (cfg.width,), names, n_in=2, use_bias=True, name=name)(windows)


class Encoder(nn.Module):
  """Spectrogram [B, T, M] -> tokens [B, N, width] after the final LayerNorm. `keep` (int32
  [B, K], 'patch' only) runs the blocks on those patches alone (the MAE's visible ones)."""
  cfg: AudioConfig

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, keep: Array | None = None) -> Array:
    cfg = self.cfg
    x = nn.with_logical_constraint(x, SPECTROGRAM)
    b = x.shape[0]
    if cfg.frontend == "patch":
      patches = patchify(cfg, x)
      h = layers.Dense(cfg, (cfg.width,), ("frames", "mel", "embed"), n_in=2, use_bias=True,
                       name="embedding")(patches)
      posemb = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), h.shape[1:],
                          cfg.params_dtype)
      h = h + posemb.astype(cfg.compute_dtype)[None]
      if keep is not None:
        h = jnp.take_along_axis(h, keep[..., None], axis=1)
    else:
      if keep is not None:
        raise ValueError("model.frontend='conv' has no patches to mask; use frontend='patch'")
      h = nn.gelu(_conv(cfg, x, 1, (None, "mel", "embed"), "conv1"))
      h = nn.gelu(_conv(cfg, h, 2, (None, None, "embed"), "conv2"))
      h = h + sinusoids(h.shape[1], cfg.width).astype(cfg.compute_dtype)[None]
    if cfg.pool == "cls":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (cfg.width,), cfg.params_dtype)
      cls = jnp.broadcast_to(cls.astype(cfg.compute_dtype), (b, 1, cfg.width))
      h = jnp.concatenate([cls, h], axis=1)
    h = nn.with_logical_constraint(h, layers.RESIDUAL)
    h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
    h = _blocks(cfg, h, train)
    return vit._layer_norm(cfg, "final_norm")(h)  # pylint: disable=protected-access


def _blocks(cfg: AudioConfig, h: Array, train: bool) -> Array:
  """cfg.depth of the ViT's pre-LN blocks (scanned and rematerialised as configured)."""
  block = vit.block_class(cfg)
  if cfg.scan_layers:
    h, _ = block(cfg, train, name="layers")(h, None)
  else:
    for i in range(cfg.depth):
      h, _ = block(cfg, train, name=f"layers_{i}")(h, None)
  return h


class AudioTransformer(nn.Module):
  """Spectrograms -> class logits (or the pooled features with num_classes=0)."""
  cfg: AudioConfig

  @nn.compact
  def __call__(self, spectrogram: Array, *, train: bool = False) -> Array:
    """spectrogram: float [B, frames, mel_bins] -> float32 [B, num_classes], or the pooled
    features [B, width] with num_classes=0."""
    cfg = self.cfg
    tokens = Encoder(cfg, name="encoder")(spectrogram, train=train)
    pooled = tokens[:, 0] if cfg.pool == "cls" else tokens.mean(axis=1)
    pooled = nn.with_logical_constraint(pooled, ("batch", "act_embed"))
    if not cfg.num_classes:
      return pooled
    return layers.ClassifierHead(cfg, name="head")(pooled)


def num_visible(cfg: AudioConfig, patches: int) -> int:
  """Patches the MAE's encoder sees: round((1 - mask_ratio) * patches), at least 1."""
  return max(1, int(round((1 - cfg.mask_ratio) * patches)))


class Decoder(nn.Module):
  """The MAE decoder: visible tokens [B, K, width] + their order -> predicted patches."""
  cfg: AudioConfig
  patch_values: int   # pt * pf

  @nn.compact
  def __call__(self, visible: Array, restore: Array, *, train: bool = False) -> Array:
    cfg = self.cfg.decoder()
    b, k, _ = visible.shape
    n = restore.shape[1]
    h = layers.Dense(cfg, (cfg.width,), (None, "embed"), use_bias=True, name="bridge")(visible)
    token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (cfg.width,), cfg.params_dtype)
    hidden = jnp.broadcast_to(token.astype(cfg.compute_dtype), (b, n - k, cfg.width))
    h = jnp.take_along_axis(jnp.concatenate([h, hidden], axis=1), restore[..., None], axis=1)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), (n, cfg.width),
                        cfg.params_dtype)
    h = nn.with_logical_constraint(h + posemb.astype(cfg.compute_dtype)[None], layers.RESIDUAL)
    h = _blocks(cfg, h, train)
    h = vit._layer_norm(cfg, "norm")(h)  # pylint: disable=protected-access
    return layers.Dense(cfg, (self.patch_values,), ("embed", None), use_bias=True,
                        name="predict")(h).astype(jnp.float32)


class AudioMAE(nn.Module):
  """Masked-spectrogram-patch modelling: (predictions, targets, hidden) for a batch."""
  cfg: AudioConfig

  @nn.compact
  def __call__(self, spectrogram: Array, noise: Array, *,
               train: bool = False) -> tuple[Array, Array, Array]:
    """spectrogram [B, T, M], noise float [B, patches] (the lowest 1 - mask_ratio are seen) ->
    (predicted float32 [B, N, pt*pf], target float32 [B, N, pt*pf], hidden float32 [B, N] 1 where
    the encoder did not see the patch)."""
    cfg = self.cfg
    if cfg.frontend != "patch" or cfg.pool != "mean":
      raise ValueError("the MAE needs model.frontend='patch' and model.pool='mean'")
    patches = patchify(cfg, spectrogram.astype(jnp.float32))
    b, n = patches.shape[:2]
    patches = patches.reshape(b, n, -1)
    k = num_visible(cfg, n)
    order = jnp.argsort(noise, axis=1)          # lowest noise first: the visible ones
    restore = jnp.argsort(order, axis=1)        # where each patch sits in (visible, hidden)
    visible = Encoder(cfg, name="encoder")(spectrogram, train=train, keep=order[:, :k])
    predicted = Decoder(cfg, patches.shape[-1], name="decoder")(visible, restore, train=train)
    hidden = (restore >= k).astype(jnp.float32)
    target = patches
    if cfg.norm_target:
      mean = target.mean(axis=-1, keepdims=True)
      target = (target - mean) / jnp.sqrt(target.var(axis=-1, keepdims=True) + 1e-6)
    return predicted, target, hidden


# ---------------------------------------------------------------- sizes and FLOPs

def matmul_params(cfg: AudioConfig, in_values: int) -> int:
  """Per-token weights of the encoder: the embedding (in_values inputs per token) and blocks."""
  d, m = cfg.width, cfg.mlp_dim
  return in_values * d + cfg.depth * (4 * d * d + 2 * d * m)


def flops_per_example(cfg: AudioConfig, frames: int, mel_bins: int) -> float:
  """Training FLOPs of one clip, the PaLM accounting as vit.flops_per_example: T tokens through
  the encoder's weights (6 per weight per token) and attention (12 * depth * width * T per
  token), + the head. The conv stem counts as its two Dense over 3-frame windows."""
  d, tokens = cfg.width, num_tokens(cfg, frames, mel_bins)
  if cfg.frontend == "conv":
    stem = 6 * (frames * 3 * mel_bins * d + (tokens - (cfg.pool == "cls")) * 3 * d * d)
    per_token = matmul_params(cfg, 0)
  else:
    stem, per_token = 0, matmul_params(cfg, cfg.patch_time * cfg.patch_freq)
  return float(tokens * (6 * per_token + 12 * cfg.depth * d * tokens) + stem
               + 6 * d * cfg.num_classes)


def mae_flops_per_example(cfg: AudioConfig, frames: int, mel_bins: int) -> float:
  """The MAE: the encoder on its visible patches, the decoder on all of them."""
  gt, gf = grid(cfg, frames, mel_bins)
  n, values = gt * gf, cfg.patch_time * cfg.patch_freq
  k, dec = num_visible(cfg, n), cfg.decoder()
  d, dd = cfg.width, dec.width
  encoder = k * (6 * matmul_params(cfg, values) + 12 * cfg.depth * d * k)
  decoder = n * (6 * (matmul_params(dec, 0) + values * dd) + 12 * dec.depth * dd * n)
  return float(encoder + decoder + 6 * k * d * dd)


# ---------------------------------------------------------------- the family, for the registry

@registry.register("family", "audio")
class AudioFamily:
  """Audio encoders as a family the config names: model.family='audio'. The task decides the
  module: 'audio_mae' trains AudioMAE, 'audio_classify' AudioTransformer."""
  POSITIVE = ("model.width", "model.depth", "model.num_heads", "model.mlp_dim",
              "model.patch_time", "model.patch_freq", "model.decoder_width",
              "model.decoder_depth", "model.decoder_heads", "model.decoder_mlp_dim")
  SPLIT_SIZES = {"heads": "model.num_heads", "mlp": "model.mlp_dim", "embed": "model.width"}
  CHOICES = {"model.dtype": ("float32", "bfloat16", "float16"),
             "model.param_dtype": ("float32", "bfloat16"),
             "model.attention": ("xla", "cudnn"),
             "model.frontend": FRONTENDS,
             "model.pool": POOLS,
             "model.remat_policy": ("none", *transformer.REMAT_POLICIES)}

  @staticmethod
  def check(config) -> None:
    AudioConfig.from_config(config.model)

  @staticmethod
  def make_model(config):
    cfg = AudioConfig.from_config(config.model)
    return AudioMAE(cfg) if config.get("task") == "audio_mae" else AudioTransformer(cfg)
