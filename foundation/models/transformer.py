"""The decoder-only language model (LLaMA architecture) and its analytic size and FLOPs.

  mcfg = transformer.ModelConfig.from_config(config.model)
  model = transformer.Transformer(mcfg)
  variables = model.init(rng, tokens, positions, segment_ids)     # {'params': nn.Partitioned boxes}
  logits = model.apply(variables, tokens, positions, segment_ids)  # float32 [B, L, vocab_size]

Param tree: embed/embedding, layers/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{wi_gate,wi_up,wo}},
final_norm/scale, output/kernel (absent when tie_embeddings); attn/{q,k,v}/bias too when qkv_bias.
With scan_layers every `layers` leaf has a leading n_layers axis (logical name 'layers'); without,
the blocks are `layers_0` ... `layers_{n-1}`.

Fine-tuning variants (foundation/finetune.py trains them):
  * LoRA: not a model field; a transform of the params (foundation/lora.py).
  * Sequence classification (`num_classes` > 0): no vocabulary output layer; a `classifier`
    head {kernel [d_model, num_classes], bias} reads the final-normed hidden state of each row's
    last real token and the model returns float32 class logits [B, num_classes]. Every other
    param is the LM's, so a pre-trained LM checkpoint fills all of it but the head.

Decoding with a KV cache (foundation/generate.py drives it):

  cache = transformer.init_cache(mcfg, batch, length)       # every slot empty, index 0
  logits, cache = model.apply(variables, tokens, positions, segment_ids, cache=cache)
  # logits: float32 [B, 1, vocab] for the last new token; the L new tokens took slots
  # index..index+L-1 and cache['index'] moved on by L.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation import registry
from foundation import models
from foundation.models import layers

Array = jax.Array

# From most memory (least recompute) to least: 'none' saves everything; 'minimal' saves every matmul
# output, the attention scores included, and recomputes only elementwise work; 'dots' saves the
# outputs of matmuls without batch dimensions -- the weight projections, linear in sequence length --
# and recomputes the rest, including the attention scores and probabilities (batched dots,
# [B, N, L, L], which dominate memory at long sequences); 'full' saves only each block's input.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig(models.Dtypes):
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
  # Pre-trained families (foundation/hf.py reads these from a Hugging Face config.json):
  qkv_bias: bool = False          # biases on the q/k/v projections (Qwen2)
  rope_scaling: str = "none"      # 'none' or 'llama3' (Llama 3.1+ frequency scaling)
  rope_scaling_factor: float = 8.0      # llama3: low frequencies are divided by this
  rope_low_freq_factor: float = 1.0     # llama3: wavelengths > original_max_len / this are scaled
  rope_high_freq_factor: float = 4.0    # llama3: wavelengths < original_max_len / this are kept
  rope_original_max_len: int = 8192     # llama3: the context length the model was first trained on
  sliding_window: int = 0         # attend only to the last N tokens (Mistral); 0 is unlimited
  # Fine-tuning (see the module docstring):
  num_classes: int = 0            # > 0: a sequence classifier with this many classes, not an LM
  causal: bool = True             # False: bidirectional attention (an encoder: a text tower)
  # A prefix LM (the vlm family): the first prefix_len columns of every row (the image tokens,
  # passed as `prefix`) attend to each other fully; the text after them is causal. 0: off.
  prefix_len: int = 0

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
    if self.rope_scaling not in ("none", "llama3"):
      raise ValueError(f"model.rope_scaling='{self.rope_scaling}' is unknown; use 'none' or "
                       f"'llama3'")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                       f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
    if self.sliding_window < 0:
      raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 0 (0: no window)")
    if self.num_classes < 0:
      raise ValueError(f"model.num_classes={self.num_classes} must be >= 0 (0: a language model)")
    if self.prefix_len < 0:
      raise ValueError(f"model.prefix_len={self.prefix_len} must be >= 0 (0: no prefix)")

  @classmethod
  def from_config(cls, config: Any) -> "ModelConfig":
    """From `config.model`; fields it has beyond these are ignored, those with a default may be
    absent (a config.json written before they existed)."""
    return models.dataclass_from_config(cls, config)


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


# The KV cache's layout: [layers, batch, cache length, kv heads, head_dim].
CACHE = ("layers", *layers.KV_HEADS)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache of `length` slots for `batch` rows.

  {'k', 'v': [n_layers, batch, length, n_kv_heads, head_dim] in the compute dtype,
   'segment_ids': int32 [batch, length] (0: empty or padding), 'index': int32 scalar (next slot)}.
  Inside jit under the logical-axis rules it is laid out like training activations.
  """
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  kv = nn.with_logical_constraint(jnp.zeros(shape, cfg.compute_dtype), CACHE)
  return {"k": kv, "v": kv, "segment_ids": jnp.zeros((batch, length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def decode_block_class(cfg: ModelConfig) -> type[nn.Module]:
  """layers.Block for decoding: no remat; scanned with the layer's cache as the scanned input."""
  if not cfg.scan_layers:
    return layers.Block
  return nn.scan(
      layers.Block, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
      metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
  """Decoder-only LM: embed, n_layers pre-norm blocks, final RMSNorm, output projection."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
               cache: dict | None = None, return_hidden: bool = False,
               last_index: Array | None = None, prefix: Array | None = None):
    """Next-token logits (or class logits, with `num_classes`).

    Args:
      tokens: int32 [B, L] token ids.
      positions: int32 [B, L] position of each token within its document (rotary angles).
      segment_ids: int32 [B, L] document ids; 0 is padding. Attention never crosses documents.
      cache: None (training, scoring: the L tokens are the whole sequence), or a KV cache from
        `init_cache` (decoding: the L tokens follow those already in the cache).
      return_hidden: return the final-normed hidden states [B, L, d_model] instead of logits (the
        chunked cross-entropy turns them into logits a slice at a time: `output_logits`).
      last_index: classifiers only: int32 [B], the column of each row's last real token, whose
        hidden state the head reads; None takes the last column with a non-zero segment id
        (rows right-padded).
      prefix: None, or [B, P, d_model] embeddings placed before the tokens' (a prefix LM's image
        tokens, P = cfg.prefix_len); positions and segment_ids then cover P + L columns. With a
        cache, only the call that writes the first slots (the prefill) passes it.
    Returns:
      float32 [B, L, vocab_size] logits; with a cache, (float32 [B, 1, vocab_size] logits of the
      last new token, the updated cache); a classifier: float32 [B, num_classes].
    """
    cfg = self.cfg
    if cfg.num_classes and cache is not None:
      raise ValueError(f"model.num_classes={cfg.num_classes}: a classifier does not decode")
    embed = layers.Embed(cfg, name="embed")
    x = embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    x = nn.with_logical_constraint(x, layers.RESIDUAL)
    if cache is None:
      block = block_class(cfg)
      if cfg.scan_layers:
        x, _ = block(cfg, name="layers")(x, positions, segment_ids)
      else:
        for i in range(cfg.n_layers):
          x, _ = block(cfg, name=f"layers_{i}")(x, positions, segment_ids)
    else:
      x, cache = self._decode_layers(x, positions, segment_ids, cache)
      x = x[:, -1:]  # decoding needs only the next token's logits
    x = layers.RMSNorm(cfg, name="final_norm")(x)
    if return_hidden:
      return x
    if cfg.num_classes:
      return layers.ClassifierHead(cfg, name="classifier")(last_token(x, segment_ids, last_index))
    logits = embed.attend(x) if cfg.tie_embeddings else layers.Unembed(cfg, name="output")(x)
    logits = nn.with_logical_constraint(logits, layers.LOGITS)
    return logits if cache is None else (logits, cache)

  def _decode_layers(self, x, positions, segment_ids, cache):
    """The blocks over x [B, L, D] with the KV cache; returns (x, updated cache)."""
    cfg, index = self.cfg, cache["index"]
    decode = {"index": index, "segment_ids": jax.lax.dynamic_update_slice(
        cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))}
    block = decode_block_class(cfg)
    if cfg.scan_layers:
      x, kv = block(cfg, name="layers")(
          x, positions, segment_ids, {"k": cache["k"], "v": cache["v"]}, decode)
    else:
      per_layer = []
      for i in range(cfg.n_layers):
        x, layer_kv = block(cfg, name=f"layers_{i}")(
            x, positions, segment_ids, {"k": cache["k"][i], "v": cache["v"][i]}, decode)
        per_layer.append(layer_kv)
      kv = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    kv = {name: nn.with_logical_constraint(a, CACHE) for name, a in kv.items()}
    return x, {**kv, "segment_ids": decode["segment_ids"],
               "index": index + jnp.int32(x.shape[1])}


def last_token(x: Array, segment_ids: Array, last_index: Array | None = None) -> Array:
  """x [B, L, D] -> [B, D]: each row's hidden state at `last_index` [B] (default: the last column
  whose segment id is non-zero; column 0 for an all-padding row)."""
  if last_index is None:
    last_index = jnp.maximum((segment_ids != 0).sum(axis=1) - 1, 0)
  return jnp.take_along_axis(x, last_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]


def output_logits(cfg: ModelConfig, params: dict, x: Array) -> Array:
  """The output projection alone: final-normed hidden x [B, L, d_model] -> float32 logits.

  The same layer the model ends with (its `output` kernel, or the tied embedding table), applied
  to the model's params; `Transformer(..., return_hidden=True)` then this equals the logits.
  """
  if cfg.tie_embeddings:
    return layers.Embed(cfg).apply({"params": params["embed"]}, x, method=layers.Embed.attend)
  return layers.Unembed(cfg).apply({"params": params["output"]}, x)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays, ShapeDtypeStructs or nn.Partitioned boxes."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def non_embedding_params(cfg: ModelConfig) -> int:
  """N of the PaLM FLOPs formula: every param except the input embedding table.

  That is all block weights and norm scales, the final norm, and the output projection -- its own
  kernel (or a classifier's head), or the tied table counted once in that role, since the logits
  matmul costs the same FLOPs either way. The input lookup is a gather: no FLOPs.
  """
  d, hd = cfg.d_model, cfg.head_dim
  attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o; k, v
  mlp = 3 * d * cfg.mlp_dim
  norms = 2 * d
  output = d * (cfg.num_classes or cfg.vocab_size)  # a classifier's head replaces the vocab output
  return cfg.n_layers * (attention + mlp + norms) + d + output


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


# ---------------------------------------------------------------- the family, for the registry

@registry.register("family", "decoder")
class DecoderFamily:
  """The decoder-only LM (LLaMA architecture) as a family the config names: model.family='decoder'."""
  # Fields that must be positive, and the logical axes its sizes split over the mesh.
  POSITIVE = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.head_dim", "model.mlp_dim", "model.max_seq_len")
  SPLIT_SIZES = {"heads": "model.n_heads", "kv_heads": "model.n_kv_heads", "mlp": "model.mlp_dim",
                 "vocab": "model.vocab_size", "embed": "model.d_model"}
  CHOICES = {"model.dtype": ("float32", "bfloat16", "float16"),
             "model.param_dtype": ("float32", "bfloat16"),
             "model.attention": ("xla", "cudnn"),
             "model.remat_policy": ("none", "minimal", "dots", "full")}

  @staticmethod
  def check(config) -> None:
    """ValueError naming the field for sizes that cannot make a model."""
    m = config.model
    if m.n_heads % m.n_kv_heads:
      raise ValueError(
          f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}: "
          f"grouped-query attention shares each kv head among n_heads / n_kv_heads query heads")
    if m.head_dim % 2:
      raise ValueError(f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    ModelConfig.from_config(m)  # LoRA, rope scaling and the other fields' own checks

  @staticmethod
  def make_model(config) -> Transformer:
    return Transformer(ModelConfig.from_config(config.model))
