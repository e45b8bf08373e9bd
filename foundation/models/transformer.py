"""The decoder-only language model (LLaMA architecture) and its analytic size and FLOPs.

  mcfg = transformer.ModelConfig.from_config(config.model)
  model = transformer.Transformer(mcfg)
  variables = model.init(rng, tokens, positions, segment_ids)     # {'params': nn.Partitioned boxes}
  logits = model.apply(variables, tokens, positions, segment_ids)  # float32 [B, L, vocab_size]

Param tree: embed/embedding, layers/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{wi_gate,wi_up,wo}},
final_norm/scale, output/kernel (absent when tie_embeddings). With scan_layers every `layers` leaf
has a leading n_layers axis (logical name 'layers'); without, the blocks are `layers_0` ...
`layers_{n-1}`.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation.models import layers

Array = jax.Array

# 'dots' saves the outputs of matmuls without batch dimensions -- the weight projections, linear in
# sequence length -- and recomputes the rest, including the attention scores and probabilities
# (batched dots, [B, N, L, L]); `dots_saveable` would keep those too, and they dominate memory.
REMAT_POLICIES = {
    "full": None,  # save nothing but the block's inputs
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyper-parameters; frozen, so hashable (a static argument and a Module field)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "bfloat16"         # compute dtype
  param_dtype: str = "float32"
  attention: str = "xla"          # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn'
  scan_layers: bool = True
  remat_policy: str = "none"      # 'none', 'full' or 'dots'

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention not in ("xla", "cudnn"):
      raise ValueError(f"model.attention='{self.attention}' is unknown; use 'xla' or 'cudnn'")
    if self.remat_policy not in ("none", *REMAT_POLICIES):
      raise ValueError(f"model.remat_policy='{self.remat_policy}' is unknown; "
                       f"use one of none, {', '.join(REMAT_POLICIES)}")

  @classmethod
  def from_config(cls, config: Any) -> "ModelConfig":
    """From `config.model` (a ConfigDict or mapping); fields it has beyond these are ignored."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in config]
    if missing:
      raise ValueError(f"config.model lacks {', '.join(missing)}")
    return cls(**{f.name: f.type(config[f.name]) for f in dataclasses.fields(cls)})

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


def block_class(cfg: ModelConfig) -> type[nn.Module]:
  """layers.Block, wrapped in nn.remat per `remat_policy` and in nn.scan when `scan_layers`."""
  block = layers.Block
  if cfg.remat_policy != "none":
    # Inside scan the loop boundary already keeps XLA from merging the recomputation back into the
    # forward pass (CSE); prevent_cse's extra optimisation barriers would only cost speed there.
    block = nn.remat(
        block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    block = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class Transformer(nn.Module):
  """Decoder-only LM: embed, n_layers pre-norm blocks, final RMSNorm, output projection."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array) -> Array:
    """Next-token logits.

    Args:
      tokens: int32 [B, L] token ids.
      positions: int32 [B, L] position of each token within its document (rotary angles).
      segment_ids: int32 [B, L] document ids; 0 is padding. Attention never crosses documents.
    Returns:
      float32 [B, L, vocab_size] logits.
    """
    cfg = self.cfg
    embed = layers.Embed(cfg, name="embed")
    x = nn.with_logical_constraint(embed(tokens), layers.RESIDUAL)
    block = block_class(cfg)
    if cfg.scan_layers:
      x, _ = block(cfg, name="layers")(x, positions, segment_ids)
    else:
      for i in range(cfg.n_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, positions, segment_ids)
    x = layers.RMSNorm(cfg, name="final_norm")(x)
    logits = embed.attend(x) if cfg.tie_embeddings else layers.Unembed(cfg, name="output")(x)
    return nn.with_logical_constraint(logits, layers.LOGITS)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays, ShapeDtypeStructs or nn.Partitioned boxes."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def non_embedding_params(cfg: ModelConfig) -> int:
  """N of the PaLM FLOPs formula: every param except the input embedding table.

  That is all block weights and norm scales, the final norm, and the output projection -- its own
  kernel, or the tied table counted once in that role, since the logits matmul costs the same FLOPs
  either way. The input lookup is a gather: no FLOPs.
  """
  d, hd = cfg.d_model, cfg.head_dim
  attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o; k, v
  mlp = 3 * d * cfg.mlp_dim
  norms = 2 * d
  return cfg.n_layers * (attention + mlp + norms) + d + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
  """Training FLOPs (forward + backward) per token, PaLM (Chowdhery et al. 2022, appendix B).

    6 * N + 12 * n_layers * n_heads * head_dim * seq_len

  N is `non_embedding_params(cfg)`; 6N covers the matmuls with weights (2 forward, 4 backward per
  weight), the second term the attention scores and their weighted sum over all `seq_len` keys.
  `causal=True` halves the attention term: the FLOPs a causal kernel actually needs, where the
  PaLM number (the MFU convention) counts the full square.
  """
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  if causal:
    attention /= 2
  return float(6 * non_embedding_params(cfg) + attention)
