"""Vision Transformer (Dosovitskiy et al. 2021), big_vision's `vit.py` shape.

  image [B, H, W, C] -> patches [B, (H/p)(W/p), p*p*C] -> Dense -> + learned position embeddings
  [-> class token first] -> n_layers pre-LN blocks (LayerNorm, bidirectional multi-head attention,
  LayerNorm, GELU MLP; every projection with a bias) -> final LayerNorm -> pool -> head.

Pools: 'cls' (the class token's output), 'mean' (the mean over patch tokens; "gap" in big_vision)
and 'map' (multi-head attention pooling: a learned probe attends over the tokens, then a
LayerNorm + MLP residual, as big_vision's MAPHead). The head is `layers.ClassifierHead` (zero
init, as big_vision's `head_zeroinit`); `num_classes=0` returns the pooled features [B, width].

The projections are the LM's `layers.Dense` and attention is `jax.nn.dot_product_attention`
(implementation `attention`), so params carry the same logical names as the LM's (`embed`,
`heads`, `head_dim`, `mlp`, `layers`) and the same `config.mesh.rules` shard them. The image
input's own names (`batch`, `height`, `width`, `channels`) need rules too; `IMAGE_RULES` holds
them (replicated).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation import registry
from foundation import models
from foundation.models import layers
from foundation.models import transformer

Array = jax.Array

POOLS = ("cls", "mean", "map")
IMAGE = ("batch", "height", "width", "channels")
# Rules for the image input's names, added to config.mesh.rules: the pixels are not split (the
# batch axis already is, by the LM's rule).
IMAGE_RULES = (("height", None), ("width", None), ("channels", None))

# name: (width, depth, heads, mlp_dim). Ti..H are the ViT paper's (and big_vision's) widths.
SIZES = {
    "test": (32, 2, 2, 64),      # exercises every path in a second on a CPU
    "tiny": (64, 4, 4, 128),     # the CPU demo on the embedded shapes (see tests/test_vit.py)
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig(models.Dtypes):
  """The ViT's hyper-parameters; frozen, so hashable (a static argument and a Module field)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 16
  num_classes: int = 1000         # 0: return the pooled features [B, width]
  pool: str = "cls"               # 'cls', 'mean' or 'map'
  posemb: str = "learn"           # learned position embeddings (the only kind, for now)
  dropout: float = 0.0            # after attention and in the MLP, with train=True only
  norm_eps: float = 1e-6          # big_vision's LayerNorm epsilon
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"
  attention: str = "xla"          # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn'
  scan_layers: bool = True
  remat_policy: str = "none"      # 'none', 'full', 'dots' or 'minimal' (transformer.REMAT_POLICIES)

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} is not divisible by model.num_heads="
                       f"{self.num_heads}")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is unknown; use one of {', '.join(POOLS)}")
    if self.posemb != "learn":
      raise ValueError(f"model.posemb={self.posemb!r} is unknown; use 'learn'")
    if self.num_classes < 0:
      raise ValueError(f"model.num_classes={self.num_classes} must be >= 0 (0: pooled features)")
    if self.patch_size < 1:
      raise ValueError(f"model.patch_size={self.patch_size} must be >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
    if self.attention not in ("xla", "cudnn"):
      raise ValueError(f"model.attention={self.attention!r} is unknown; use 'xla' or 'cudnn'")
    if self.remat_policy not in ("none", *transformer.REMAT_POLICIES):
      raise ValueError(f"model.remat_policy={self.remat_policy!r} is unknown; use one of none, "
                       f"{', '.join(transformer.REMAT_POLICIES)}")

  @classmethod
  def from_config(cls, config: Any) -> "ViTConfig":
    """From `config.model`; fields it has beyond these are ignored."""
    return models.dataclass_from_config(cls, config)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def model_config(size: str, **overrides) -> dict:
  """The `config.model` fields of a SIZES entry (a plain dict; the config wraps it)."""
  if size not in SIZES:
    raise ValueError(f"ViT size {size!r} is unknown; sizes: {', '.join(SIZES)}")
  width, depth, heads, mlp = SIZES[size]
  fields = dict(family="vit", width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
                patch_size=8 if size in ("test", "tiny") else 16, num_classes=1000, pool="cls",
                posemb="learn", dropout=0.0, norm_eps=1e-6, dtype="float32",
                param_dtype="float32", attention="xla", scan_layers=True, remat_policy="none")
  fields.update(overrides)
  return fields


def check(config_model: Any, image_size: int | tuple[int, int]) -> None:
  """Raises ValueError naming the fields when `config.model` cannot run on `image_size` images."""
  cfg = ViTConfig.from_config(config_model)  # heads vs width, pool, ...
  height, width = _pair(image_size)
  for name, side in (("height", height), ("width", width)):
    if side % cfg.patch_size:
      raise ValueError(f"data.image_size={image_size} (image {name} {side}) is not divisible by "
                       f"model.patch_size={cfg.patch_size}")


def _pair(size) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def num_tokens(cfg: ViTConfig, image_size) -> int:
  """Tokens the encoder sees: the patches, plus the class token with pool='cls'."""
  height, width = _pair(image_size)
  return (height // cfg.patch_size) * (width // cfg.patch_size) + (cfg.pool == "cls")


# ---------------------------------------------------------------- layers

def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  """Bidirectional multi-head attention, q from `x`, k/v from `inputs_kv` (default `x`)."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x: Array, inputs_kv: Array | None = None) -> Array:
    cfg = self.cfg
    kv = x if inputs_kv is None else inputs_kv
    heads = (cfg.num_heads, cfg.head_dim)
    names = ("embed", "heads", "head_dim")
    q = layers.Dense(cfg, heads, names, use_bias=True, name="q")(x)
    k = layers.Dense(cfg, heads, names, use_bias=True, name="k")(kv)
    v = layers.Dense(cfg, heads, names, use_bias=True, name="v")(kv)
    q, k, v = (nn.with_logical_constraint(a, layers.Q_HEADS) for a in (q, k, v))
    # No mask: every token sees every token (an encoder).
    out = jax.nn.dot_product_attention(q, k, v, implementation=cfg.attention)
    out = nn.with_logical_constraint(out, layers.Q_HEADS)
    return layers.Dense(cfg, (cfg.width,), ("heads", "head_dim", "embed"), n_in=2, use_bias=True,
                        name="o")(out)


class Mlp(nn.Module):
  """wo(gelu(x @ wi + b) [dropout]) + b: [B, L, D] -> [B, L, D]."""
  cfg: ViTConfig
  train: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    h = layers.Dense(cfg, (cfg.mlp_dim,), ("embed", "mlp"), use_bias=True, name="wi")(x)
    h = nn.with_logical_constraint(nn.gelu(h), layers.MLP_HIDDEN)
    h = nn.Dropout(cfg.dropout, deterministic=not self.train)(h)
    return layers.Dense(cfg, (cfg.width,), ("mlp", "embed"), use_bias=True, name="wo")(h)


class Block(nn.Module):
  """Pre-LN encoder block: x + Attn(LN(x)), then x + MLP(LN(x)). Returns (x, None) for nn.scan."""
  cfg: ViTConfig
  train: bool = False

  @nn.compact
  def __call__(self, x: Array, _=None) -> tuple[Array, None]:
    cfg = self.cfg
    h = Attention(cfg, name="attn")(_layer_norm(cfg, "attn_norm")(x))
    h = nn.Dropout(cfg.dropout, deterministic=not self.train)(h)
    x = nn.with_logical_constraint(x + h, layers.RESIDUAL)
    h = Mlp(cfg, self.train, name="mlp")(_layer_norm(cfg, "mlp_norm")(x))
    h = nn.Dropout(cfg.dropout, deterministic=not self.train)(h)
    x = nn.with_logical_constraint(x + h, layers.RESIDUAL)
    return x, None


class MapHead(nn.Module):
  """Multi-head attention pooling (big_vision MAPHead): a learned probe attends over the tokens,
  then LN + MLP residual: [B, L, D] -> [B, D]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, cfg.width),
                       cfg.params_dtype)
    probe = jnp.tile(probe.astype(cfg.compute_dtype), (x.shape[0], 1, 1))
    x = Attention(cfg, name="attn")(probe, x)
    x = x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm")(x))
    return x[:, 0]


def block_class(cfg: ViTConfig) -> type[nn.Module]:
  """Block, wrapped in nn.remat per `remat_policy` and in nn.scan when `scan_layers` (as the LM)."""
  block = Block
  if cfg.remat_policy != "none":
    block = nn.remat(block, policy=transformer.REMAT_POLICIES[cfg.remat_policy],
                     prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    block = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, length=cfg.depth,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class ViT(nn.Module):
  """Images -> class logits (or pooled features with num_classes=0)."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    """images: float [B, H, W, C] (H, W multiples of patch_size) -> float32 [B, num_classes],
    or the pooled features [B, width] in the compute dtype when num_classes=0. train=True turns
    dropout on (it then needs rngs={'dropout': key})."""
    cfg, p = self.cfg, self.cfg.patch_size
    images = nn.with_logical_constraint(images, IMAGE)
    b, height, width, channels = images.shape
    if height % p or width % p:
      raise ValueError(f"image {height}x{width} is not divisible by model.patch_size={p}")
    gh, gw = height // p, width // p
    # Non-overlapping patches, each [p, p, C] (the layout of a stride-p conv's kernel).
    patches = images.reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p, p, channels)
    x = layers.Dense(cfg, (cfg.width,), ("height", "width", "channels", "embed"), n_in=3,
                     use_bias=True, name="embedding")(patches)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), (gh * gw, cfg.width),
                        cfg.params_dtype)
    x = x + posemb.astype(cfg.compute_dtype)[None]
    if cfg.pool == "cls":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (cfg.width,), cfg.params_dtype)
      cls = jnp.broadcast_to(cls.astype(cfg.compute_dtype), (b, 1, cfg.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = nn.with_logical_constraint(x, layers.RESIDUAL)
    x = nn.Dropout(cfg.dropout, deterministic=not train)(x)

    block = block_class(cfg)
    if cfg.scan_layers:
      x, _ = block(cfg, train, name="layers")(x, None)
    else:
      for i in range(cfg.depth):
        x, _ = block(cfg, train, name=f"layers_{i}")(x, None)
    x = _layer_norm(cfg, "final_norm")(x)

    if cfg.pool == "cls":
      pooled = x[:, 0]
    elif cfg.pool == "mean":
      pooled = x.mean(axis=1)
    else:
      pooled = MapHead(cfg, name="map_head")(x)
    pooled = nn.with_logical_constraint(pooled, ("batch", "act_embed"))
    if not cfg.num_classes:
      return pooled
    return layers.ClassifierHead(cfg, name="head")(pooled)


# ---------------------------------------------------------------- sizes and FLOPs

def count_params(cfg: ViTConfig, image_size, channels: int = 3) -> int:
  """The exact number of params of ViT(cfg) on `image_size` images with `channels` channels (the
  biases and norms too)."""
  d, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
  height, width = _pair(image_size)
  patches = (height // p) * (width // p)
  block = 4 * (d * d + d) + (2 * d * m + m + d) + 2 * 2 * d   # q k v o; wi wo; two LayerNorms
  total = (p * p * channels * d + d) + patches * d + cfg.depth * block + 2 * d
  if cfg.pool == "cls":
    total += d
  if cfg.pool == "map":
    total += d + block - 2 * d     # the probe, attention + MLP + one LayerNorm
  if cfg.num_classes:
    total += d * cfg.num_classes + cfg.num_classes
  return total


def matmul_params(cfg: ViTConfig, channels: int = 3) -> int:
  """The weights each token passes through per forward (the per-token 2N of 6N), as the LM's
  `non_embedding_params`: the patch embedding and the blocks' projections. The head and the MAP
  pooler run once per image, not per token; the flops formula adds them separately."""
  d, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
  return p * p * channels * d + cfg.depth * (4 * d * d + 2 * d * m)


def flops_per_example(cfg: ViTConfig, image_size, channels: int = 3) -> float:
  """Training FLOPs (forward + backward) of one image, the PaLM accounting (Chowdhery et al.
  2022, appendix B) applied to the encoder's T tokens, as `transformer.flops_per_token`:

    T * (6 * N_matmul + 12 * depth * width * T)  +  6 * width * num_classes  [+ MAP pooler]

  N_matmul is `matmul_params` (2 FLOPs forward, 4 backward per weight per token); the second term
  is attention's scores and weighted sum over all T keys (bidirectional: the full square, no
  causal halving). The head (and the MAP pooler's probe query) act once per image. Elementwise
  work (norms, GELU, softmax) is not counted, as in PaLM and MaxText.
  """
  d = cfg.width
  tokens = num_tokens(cfg, image_size)
  flops = tokens * (6 * matmul_params(cfg, channels) + 12 * cfg.depth * d * tokens)
  flops += 6 * d * cfg.num_classes
  if cfg.pool == "map":
    # k, v over all tokens; q, o, MLP for the one probe; its attention over T keys.
    flops += 6 * (tokens * 2 * d * d + 2 * d * d + 2 * d * cfg.mlp_dim) + 12 * d * tokens
  return float(flops)


# ---------------------------------------------------------------- the family, for the registry

@registry.register("family", "vit")
class ViTFamily:
  """The Vision Transformer as a family the config names: model.family='vit'."""
  POSITIVE = ("model.width", "model.depth", "model.num_heads", "model.mlp_dim",
              "model.patch_size")
  SPLIT_SIZES = {"heads": "model.num_heads", "mlp": "model.mlp_dim", "embed": "model.width"}
  CHOICES = {"model.dtype": ("float32", "bfloat16", "float16"),
             "model.param_dtype": ("float32", "bfloat16"),
             "model.attention": ("xla", "cudnn"),
             "model.pool": POOLS,
             "model.remat_policy": ("none", *transformer.REMAT_POLICIES)}

  @staticmethod
  def check(config) -> None:
    ViTConfig.from_config(config.model)  # heads vs width, pool, dropout, ...

  @staticmethod
  def make_model(config) -> "ViT":
    return ViT(ViTConfig.from_config(config.model))
