"""Two towers (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): an image tower and a text
tower, each projected to a shared embedding, unit-normalised, compared by a scaled dot product.

  images [B, H, W, C] -> ViT (num_classes=0: pooled features)  -> [image_head] -> normalise
  text   [B, T] ids   -> TextTower (an encoder, pooled)        -> [text_head]  -> normalise
  logits[i, j] = exp(t) * <image_i, text_j> + b        (t: log temperature, b: bias; learned)

The image tower is the ViT family (foundation/models/vit.py) as is. The text tower has two
architectures (model.text.arch):
  'decoder'  our LLaMA transformer (foundation/models/transformer.py) with `causal=False`:
             RMSNorm, rotary positions, SwiGLU, bidirectional attention within the text's real
             tokens (padding masked); pooled at the last real token (EOS) or by a masked mean.
  'siglip'   SigLIP's text encoder: token + learned position embeddings, the ViT's pre-LN blocks
             (LayerNorm, GELU, biases), a final LayerNorm, pooled at the last column. As SigLIP, it
             attends over the whole padded row (SigLIP pads every text to a fixed length); a
             Hugging Face SiglipModel imports into it (foundation/interop_siglip.py).
The heads (`image_proj`, `text_proj`: a Dense with bias to model.embed_dim) may be left out, a
tower's width then being the embedding (SigLIP has no image head: its MAP pooler is the
embedding); a width that does not match embed_dim is then a one-line error.

Params: image/ (the ViT's tree), text/, image_head/, text_head/ (kernel, bias), t, b. The heads'
output axis is the logical name 'joint_embed' (TWO_TOWER_RULES: replicated).
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

TEXT_ARCHS = ("decoder", "siglip")
TEXT_POOLS = ("last", "mean")
# The logical names the family adds to config.mesh.rules (with vit.IMAGE_RULES).
TWO_TOWER_RULES = (("joint_embed", None),)

# name: image (width, depth, heads, mlp), text (width, depth, heads, mlp), embed_dim
SIZES = {
    "test": ((32, 2, 2, 64), (32, 2, 2, 64), 32),
    "tiny": ((64, 4, 4, 128), (64, 2, 4, 128), 64),
    "B": ((768, 12, 12, 3072), (768, 12, 12, 3072), 768),   # SigLIP B/16's shapes
}


@dataclasses.dataclass(frozen=True)
class TextConfig(models.Dtypes):
  """The text tower's hyper-parameters (config.model.text)."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  arch: str = "decoder"          # 'decoder' or 'siglip' (module docstring)
  num_kv_heads: int = 0          # decoder: grouped-query kv heads; 0 means num_heads
  pool: str = "last"             # 'last' (decoder: last real token; siglip: last column), 'mean'
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "xla"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    if self.arch not in TEXT_ARCHS:
      raise ValueError(f"model.text.arch={self.arch!r} is unknown; use one of {TEXT_ARCHS}")
    if self.pool not in TEXT_POOLS:
      raise ValueError(f"model.text.pool={self.pool!r} is unknown; use one of {TEXT_POOLS}")
    if self.width % self.num_heads:
      raise ValueError(f"model.text.width={self.width} is not divisible by model.text.num_heads="
                       f"{self.num_heads}")
    if self.arch == "decoder":
      self.decoder_config()  # the transformer's own checks (kv heads, even head_dim, ...)
    else:
      self.encoder_config()

  @classmethod
  def from_config(cls, config: Any) -> "TextConfig":
    return models.dataclass_from_config(cls, config)

  def decoder_config(self) -> transformer.ModelConfig:
    return transformer.ModelConfig(
        vocab_size=self.vocab_size, d_model=self.width, n_layers=self.depth,
        n_heads=self.num_heads, n_kv_heads=self.num_kv_heads or self.num_heads,
        head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim, max_seq_len=self.max_len,
        rope_theta=self.rope_theta, norm_eps=self.norm_eps, dtype=self.dtype,
        param_dtype=self.param_dtype, attention=self.attention, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, causal=False)

  def encoder_config(self) -> vit.ViTConfig:
    return vit.ViTConfig(
        width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        patch_size=1, num_classes=0, pool="mean", norm_eps=self.norm_eps, dtype=self.dtype,
        param_dtype=self.param_dtype, attention=self.attention, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy)


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
  image: vit.ViTConfig
  text: TextConfig
  embed_dim: int
  image_proj: bool = True
  text_proj: bool = True
  temperature_init: float = 10.0   # exp(t) at init: SigLIP 10, CLIP 1/0.07
  bias_init: float = -10.0         # b at init: SigLIP -10 (CLIP: 0)
  max_scale: float = 0.0           # > 0: exp(t) is clipped here (CLIP: 100); SigLIP: none

  @classmethod
  def from_config(cls, config: Any) -> "TwoTowerConfig":
    """From `config.model` (its `image` and `text` groups); ValueError naming the field."""
    image = vit.ViTConfig.from_config(config.image)
    if image.num_classes:
      raise ValueError(f"model.image.num_classes={image.num_classes}: the image tower returns "
                       f"pooled features; set it to 0")
    cfg = cls(image=image, text=TextConfig.from_config(config.text),
              embed_dim=int(config.embed_dim), image_proj=bool(config.image_proj),
              text_proj=bool(config.text_proj),
              temperature_init=float(config.temperature_init),
              bias_init=float(config.bias_init), max_scale=float(config.get("max_scale", 0.0)))
    for tower, width, projected in (("image", image.width, cfg.image_proj),
                                    ("text", cfg.text.width, cfg.text_proj)):
      if not projected and width != cfg.embed_dim:
        raise ValueError(f"model.{tower}.width={width} does not match model.embed_dim="
                         f"{cfg.embed_dim}: without a head (model.{tower}_proj=False) the "
                         f"{tower} tower's features are the embedding; set model.{tower}_proj="
                         f"True or make the widths equal")
    if cfg.embed_dim <= 0 or cfg.temperature_init <= 0:
      raise ValueError(f"model.embed_dim={cfg.embed_dim} and model.temperature_init="
                       f"{cfg.temperature_init} must be positive")
    return cfg


# ---------------------------------------------------------------- the text tower

def positions_of(segments: Array) -> Array:
  """int32 [B, T]: 0, 1, ... over each row's real tokens (right-padded rows)."""
  return jnp.maximum(jnp.cumsum((segments != 0).astype(jnp.int32), axis=1) - 1, 0)


class TextTower(nn.Module):
  """Token ids [B, T] (+ segments: 1 real, 0 padding) -> pooled features [B, width]."""
  cfg: TextConfig

  @nn.compact
  def __call__(self, tokens: Array, segments: Array) -> Array:
    cfg = self.cfg
    if cfg.arch == "decoder":
      x = transformer.Transformer(cfg.decoder_config(), name="encoder")(
          tokens, positions_of(segments), segments, return_hidden=True)
      if cfg.pool == "last":
        return transformer.last_token(x, segments)
    else:
      ecfg = cfg.encoder_config()
      if tokens.shape[1] > cfg.max_len:
        raise ValueError(f"texts of {tokens.shape[1]} tokens are longer than model.text.max_len="
                         f"{cfg.max_len}")
      table = self.param("embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), ("vocab", "embed")),
                         (cfg.vocab_size, cfg.width), cfg.params_dtype)
      posemb = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), (cfg.max_len, cfg.width),
                          cfg.params_dtype)
      x = jnp.take(table, tokens, axis=0) + posemb[None, :tokens.shape[1]]
      x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), layers.RESIDUAL)
      block = vit.block_class(ecfg)
      if ecfg.scan_layers:
        x, _ = block(ecfg, False, name="layers")(x, None)
      else:
        for i in range(ecfg.depth):
          x, _ = block(ecfg, False, name=f"layers_{i}")(x, None)
      x = vit._layer_norm(ecfg, "final_norm")(x)  # pylint: disable=protected-access
      if cfg.pool == "last":
        return x[:, -1]
    weights = (segments != 0).astype(jnp.float32)[..., None]   # 'mean' over the real tokens
    return ((x.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
            ).astype(cfg.compute_dtype)


# ---------------------------------------------------------------- the two towers

def _normalise(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class TwoTower(nn.Module):
  """(images, text ids, text segments) -> (image embeddings [B, E], text embeddings [B, E],
  scale exp(t) clipped at max_scale, bias b): embeddings float32 and unit-normalised."""
  cfg: TwoTowerConfig

  def setup(self):
    cfg = self.cfg
    self.image = vit.ViT(cfg.image)
    self.text = TextTower(cfg.text)
    if cfg.image_proj:
      self.image_head = layers.Dense(cfg.image, (cfg.embed_dim,), ("embed", "joint_embed"),
                                     use_bias=True)
    if cfg.text_proj:
      self.text_head = layers.Dense(cfg.text, (cfg.embed_dim,), ("embed", "joint_embed"),
                                    use_bias=True)
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
    self.t = self.param("t", scalar(math.log(cfg.temperature_init)), (), jnp.float32)
    self.b = self.param("b", scalar(cfg.bias_init), (), jnp.float32)

  def encode_image(self, images: Array) -> Array:
    x = self.image(images)
    return _normalise(self.image_head(x) if self.cfg.image_proj else x)

  def encode_text(self, tokens: Array, segments: Array) -> Array:
    x = self.text(tokens, segments)
    return _normalise(self.text_head(x) if self.cfg.text_proj else x)

  def scale_and_bias(self) -> tuple[Array, Array]:
    scale = jnp.exp(self.t)
    return (jnp.minimum(scale, self.cfg.max_scale) if self.cfg.max_scale else scale), self.b

  def __call__(self, images: Array, tokens: Array, segments: Array):
    scale, bias = self.scale_and_bias()
    return self.encode_image(images), self.encode_text(tokens, segments), scale, bias


def model_config(size: str, **overrides) -> dict:
  """The config.model fields of a SIZES entry (plain dicts; the config wraps them)."""
  if size not in SIZES:
    raise ValueError(f"two-tower size {size!r} is unknown; sizes: {', '.join(SIZES)}")
  (iw, idp, ih, im), (tw, tdp, th, tm), embed = SIZES[size]
  image = vit.model_config("tiny", width=iw, depth=idp, num_heads=ih, mlp_dim=im, num_classes=0,
                           pool="map", patch_size=8 if size in ("test", "tiny") else 16)
  image.pop("family")
  text = dict(arch="decoder", vocab_size=264, width=tw, depth=tdp, num_heads=th, num_kv_heads=0,
              mlp_dim=tm, max_len=64, pool="last", norm_eps=1e-6, rope_theta=10_000.0,
              dtype="float32", param_dtype="float32", attention="xla", scan_layers=True,
              remat_policy="none")
  fields = dict(family="two_tower", embed_dim=embed, image_proj=True, text_proj=True,
                temperature_init=10.0, bias_init=-10.0, max_scale=0.0, image=image, text=text)
  fields.update(overrides)
  return fields


def text_flops_per_example(cfg: TextConfig, length: int) -> float:
  """Training FLOPs of one text of `length` tokens (PaLM accounting, bidirectional attention)."""
  d, m = cfg.width, cfg.mlp_dim
  kv = (cfg.num_kv_heads or cfg.num_heads) * (d // cfg.num_heads)
  per_layer = (2 * d * d + 2 * d * kv + 3 * d * m) if cfg.arch == "decoder" else (
      4 * d * d + 2 * d * m)
  return length * (6 * cfg.depth * per_layer + 12 * cfg.depth * d * length)


@registry.register("family", "two_tower")
class TwoTowerFamily:
  """model.family='two_tower': the contrastive image-text model (tasks 'siglip' and 'clip')."""
  POSITIVE = ("model.embed_dim", "model.image.width", "model.image.depth",
              "model.image.num_heads", "model.image.mlp_dim", "model.text.vocab_size",
              "model.text.width", "model.text.depth", "model.text.num_heads",
              "model.text.mlp_dim", "model.text.max_len")
  # One field per logical axis (the core's check): the image tower's; the text tower's sizes are
  # checked param by param (config.check_param_shardings names the param and the axes).
  SPLIT_SIZES = {"heads": "model.image.num_heads", "mlp": "model.image.mlp_dim",
                 "embed": "model.image.width", "vocab": "model.text.vocab_size"}

  @staticmethod
  def check(config) -> None:
    TwoTowerConfig.from_config(config.model)

  @staticmethod
  def make_model(config) -> TwoTower:
    return TwoTower(TwoTowerConfig.from_config(config.model))
