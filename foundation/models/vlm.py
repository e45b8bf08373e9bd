r"""An image-conditioned language model (PaliGemma / LLaVA style): model.family='vlm'.

  image [B, H, W, C] -> the ViT's encoder (vit.py's patch embedding, position embeddings, blocks,
      final LayerNorm; tokens NOT pooled) -> [B, P, image width]
  -> projection (a Dense with bias) -> [B, P, d_model]: the image tokens
  -> our decoder (transformer.py) with the image tokens as a PREFIX of the text's embeddings:
      full attention among the P prefix columns, causal on the text, every text token seeing the
      whole prefix (a prefix LM: ModelConfig.prefix_len = P)
  -> logits of the text columns only [B, T, vocab].

Params: image/ (the ViT's names: embedding, pos_embedding, cls with pool='cls', layers,
final_norm), projection/ (kernel, bias), decoder/ (the LM's: embed, layers, final_norm, output).
So a ViT workdir's params fill image/ and an LM workdir's fill decoder/ unchanged: the core's
`--config.init_from=image=VIT_WORKDIR,decoder=LM_WORKDIR` (the ViT's head is left out; a MAP
pooler or class token the image tower lacks is named, to skip with `init_from_skip='image/cls'`).

Positions: the prefix takes rotary positions 0..P-1, the text P, P+1, ...; the call takes the
text's own positions (0-based) and shifts them. Decoding (foundation/generate.py): the prefill call
passes `image` (the prefix is written to cache slots 0..P-1), the decode steps do not.

`model.text_only=True` is the text-only baseline: the same decoder, no image tower, no prefix.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation import registry
from foundation.models import layers
from foundation.models import transformer
from foundation.models import vit

Array = jax.Array

# The placeholder a prompt template must begin with: the image tokens' place (the prefix).
IMAGE_PLACEHOLDER = "<image>"

# name: image (width, depth, heads, mlp), decoder (d_model, layers, heads, mlp)
SIZES = {
    "test": ((32, 2, 2, 64), (32, 2, 2, 64)),
    "tiny": ((64, 4, 4, 128), (64, 2, 4, 128)),
    "B": ((768, 12, 12, 3072), (1024, 16, 8, 4096)),
}


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """The image tower's and the decoder's configs, and how many image tokens the prefix holds."""
  image: vit.ViTConfig
  decoder: transformer.ModelConfig   # prefix_len = num_image_tokens (0 when text_only)
  num_image_tokens: int
  text_only: bool = False

  @classmethod
  def from_config(cls, model: Any, image_size: int) -> "VLMConfig":
    """From `config.model` (its `image` and `decoder` groups) for `image_size` images."""
    image = vit.ViTConfig.from_config(model.image)
    vit.check(model.image, image_size)
    text_only = bool(model.get("text_only", False))
    tokens = 0 if text_only else vit.num_tokens(image, image_size)
    decoder = transformer.ModelConfig.from_config(model.decoder)
    if decoder.num_classes:
      raise ValueError(f"model.decoder.num_classes={decoder.num_classes}: the vlm's decoder is a "
                       f"language model; set it to 0")
    if tokens >= decoder.max_seq_len:
      raise ValueError(f"model.decoder.max_seq_len={decoder.max_seq_len} leaves no room for text "
                       f"after the {tokens} image tokens")
    return cls(image=image, decoder=dataclasses.replace(decoder, prefix_len=tokens),
               num_image_tokens=tokens, text_only=text_only)

  # What generate.py and evaluate.py read from a model's cfg: the text's room and the depth.
  @property
  def max_seq_len(self) -> int:
    return self.decoder.max_seq_len - self.num_image_tokens

  @property
  def n_layers(self) -> int:
    return self.decoder.n_layers

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size


class ImageTokens(nn.Module):
  """The ViT's encoder without its pooling or head: images [B, H, W, C] -> tokens [B, P, width].
  Param names are vit.ViT's, so a ViT checkpoint's params load here unchanged."""
  cfg: vit.ViTConfig

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg, p = self.cfg, self.cfg.patch_size
    images = nn.with_logical_constraint(images, vit.IMAGE)
    b, height, width, channels = images.shape
    gh, gw = height // p, width // p
    patches = images.reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p, p, channels)
    x = layers.Dense(cfg, (cfg.width,), ("height", "width", "channels", "embed"), n_in=3,
                     use_bias=True, name="embedding")(patches)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), (gh * gw, cfg.width),
                        cfg.params_dtype)
    x = x + posemb.astype(cfg.compute_dtype)[None]
    if cfg.pool == "cls":  # a pre-trained 'cls' ViT's class token stays one of the image tokens
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (cfg.width,), cfg.params_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.compute_dtype), (b, 1, cfg.width)), x],
                          axis=1)
    x = nn.with_logical_constraint(x, layers.RESIDUAL)
    block = vit.block_class(cfg)
    if cfg.scan_layers:
      x, _ = block(cfg, False, name="layers")(x, None)
    else:
      for i in range(cfg.depth):
        x, _ = block(cfg, False, name=f"layers_{i}")(x, None)
    return vit._layer_norm(cfg, "final_norm")(x)  # pylint: disable=protected-access


class VLM(nn.Module):
  """Image tokens as the prefix of a decoder: (text tokens, positions, segments, image) -> logits."""
  cfg: VLMConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
               cache: dict | None = None, image: Array | None = None):
    """Next-token logits of the text.

    Args:
      tokens, positions, segment_ids: int32 [B, T] the text (positions 0-based: the model puts
        them after the prefix's), as transformer.Transformer's.
      cache: None (training, scoring), or a KV cache of transformer.init_cache(cfg.decoder, ...)
        (decoding; the prefill call passes `image`, the decode steps do not).
      image: float [B, H, W, C]; needed without a cache (and ignored by a text_only model).
    Returns:
      float32 [B, T, vocab] logits of the text columns; with a cache, (float32 [B, 1, vocab] of
      the last new token, the updated cache).
    """
    cfg = self.cfg
    prefix = None
    positions = positions + cfg.num_image_tokens
    if not cfg.text_only and (image is not None or cache is None):
      if image is None:
        raise ValueError("the vlm family needs an image with its text (no cache: a whole row)")
      tokens_img = ImageTokens(cfg.image, name="image")(image)
      prefix = layers.Dense(cfg.decoder, (cfg.decoder.d_model,), (None, "embed"), use_bias=True,
                            name="projection")(tokens_img)
      batch, p = prefix.shape[0], prefix.shape[1]
      positions = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (batch, p)), positions], axis=1)
      segment_ids = jnp.concatenate(
          [jnp.ones((batch, p), segment_ids.dtype), segment_ids], axis=1)
    decoder = transformer.Transformer(cfg.decoder, name="decoder")
    out = decoder(tokens, positions, segment_ids, cache=cache, prefix=prefix)
    if cache is not None:
      return out
    return out[:, cfg.num_image_tokens:]


# ---------------------------------------------------------------- config fields

def model_config(size: str, vocab_size: int = 264, max_seq_len: int = 128, **overrides) -> dict:
  """The config.model fields of a SIZES entry (plain dicts; the config wraps them)."""
  if size not in SIZES:
    raise ValueError(f"vlm size {size!r} is unknown; sizes: {', '.join(SIZES)}")
  (iw, idp, ih, im), (d, n, h, m) = SIZES[size]
  small = size in ("test", "tiny")
  image = vit.model_config("tiny", width=iw, depth=idp, num_heads=ih, mlp_dim=im, num_classes=0,
                           pool="mean", patch_size=8 if small else 16)
  image.pop("family")
  decoder = dict(vocab_size=vocab_size, d_model=d, n_layers=n, n_heads=h, n_kv_heads=h,
                 head_dim=d // h, mlp_dim=m, max_seq_len=max_seq_len, rope_theta=10_000.0,
                 norm_eps=1e-5, tie_embeddings=False, dtype="float32" if small else "bfloat16",
                 param_dtype="float32", attention="xla", scan_layers=True, remat_policy="none")
  fields = dict(family="vlm", text_only=False, image=image, decoder=decoder)
  fields.update(overrides)
  return fields


def flops_per_example(cfg: VLMConfig, image_size, text_len: int) -> float:
  """Training FLOPs of one (image, text) row: the ViT's encoder on its tokens (vit.py's count,
  no head), the projection, and the decoder over P + T columns (PaLM accounting, as the LM)."""
  flops = 0.0
  if not cfg.text_only:
    flops += vit.flops_per_example(dataclasses.replace(cfg.image, num_classes=0), image_size)
    flops += 6 * cfg.num_image_tokens * cfg.image.width * cfg.decoder.d_model
  columns = cfg.num_image_tokens + text_len
  return flops + transformer.flops_per_token(cfg.decoder, columns) * columns


def make(config) -> VLM:
  return VLM(VLMConfig.from_config(config.model, int(config.data.image_size)))


# ---------------------------------------------------------------- the family, for the registry

class VLMFamily:
  """model.family='vlm': the image-conditioned LM (task 'vlm')."""
  POSITIVE = ("model.image.width", "model.image.depth", "model.image.num_heads",
              "model.image.mlp_dim", "model.image.patch_size", "model.decoder.vocab_size",
              "model.decoder.d_model", "model.decoder.n_layers", "model.decoder.n_heads",
              "model.decoder.n_kv_heads", "model.decoder.head_dim", "model.decoder.mlp_dim",
              "model.decoder.max_seq_len")
  # One field per logical axis (the core's check): the decoder's; the image tower's sizes are
  # checked param by param (config.check_param_shardings names the param and the axes).
  SPLIT_SIZES = {"heads": "model.decoder.n_heads", "kv_heads": "model.decoder.n_kv_heads",
                 "mlp": "model.decoder.mlp_dim", "vocab": "model.decoder.vocab_size",
                 "embed": "model.decoder.d_model"}

  @staticmethod
  def check(config) -> None:
    VLMConfig.from_config(config.model, int(config.data.image_size))

  @staticmethod
  def make_model(config) -> VLM:
    return make(config)


registry.register("family", "vlm")(VLMFamily)
