"""The pieces of a LLaMA decoder block: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP, the token embedding and the output projection.

Every param carries logical axis names (`nn.with_logical_partitioning`) and the key activations
are constrained by logical names (`nn.with_logical_constraint`); `config.mesh.rules` maps them to
mesh axes. Params are created in `cfg.param_dtype` and cast to the compute `cfg.dtype` where they
are used. No layer has a bias, except the optional q/k/v biases of Qwen2-style models
(`cfg.qkv_bias`).

Decoding: `Attention`, `Block` and the decoder model take an optional KV cache (see
models/transformer.py);
without one the computation is exactly the training one.

LoRA is not here: it is a transform of the params (foundation/lora.py), for any family.

Init scheme (LeCun / MaxText style; the forward pass has no multipliers, so Hugging Face LLaMA
weights import unchanged):
  * every projection kernel: truncated normal, std 1/sqrt(fan_in), so each matmul keeps its
    input's scale;
  * untied input embedding: normal(1.0), so the residual stream starts at the same RMS (1) as the
    branch outputs added to it; RMSNorm before every branch makes the absolute scale harmless;
  * tied embedding: normal(1/sqrt(d_model)) -- the table is also the output projection, and this is
    that projection's fan-in init: logits of RMS-normalised features start with std ~1;
  * RMSNorm scales: ones.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
# A family's frozen config dataclass (the decoder's ModelConfig, the ViT's ViTConfig...): the
# layers read the fields they need from it (d_model, n_heads, dtype, ...).
Config = Any

kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

# Logical names of the activations (mapped to mesh axes by the `act_*` rules).
RESIDUAL = ("batch", "length", "act_embed")
Q_HEADS = ("batch", "length", "act_heads", "head_dim")
KV_HEADS = ("batch", "length", "act_kv_heads", "head_dim")
MLP_HIDDEN = ("batch", "length", "act_mlp")
LOGITS = ("batch", "length", "act_vocab")


class Dense(nn.Module):
  """Bias-free projection: x [..., *in] @ kernel [*in, *features] -> [..., *features], `cfg.dtype`.

  Contracts the last `n_in` axes of x. Not nn.DenseGeneral: it initialises a flattened 2-D kernel
  and unboxes that under the kernel's 3-D logical names, a rank error under a mesh with logical
  rules (tests/test_model.py::test_sharded_apply_matches_unsharded).
  """
  cfg: Config
  features: tuple[int, ...]
  names: tuple[str, ...]   # logical names of the kernel's axes
  n_in: int = 1
  use_bias: bool = False   # a bias over `features` (zeros at init), added after the matmul

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, n_in = self.cfg, self.n_in
    in_shape = x.shape[x.ndim - n_in:]
    shape = (*in_shape, *self.features)
    init = nn.initializers.variance_scaling(  # fan_in = product of all contracted axes
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), shape,
                        cfg.params_dtype)
    x, kernel = x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype)
    y = _contract(x, kernel, n_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[n_in:]), self.features, cfg.params_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


def _contract(x: Array, w: Array, n_in: int) -> Array:
  """x [..., *in] . w [*in, *out] -> [..., *out], contracting the n_in `in` axes.

  As one 2-D product, [tokens, in] . [in, out]: the same sums, but XLA on a CPU runs the forward
  and both backward products of a 2-D dot directly, where a dot over [B, L, D] makes it transpose
  the activations' gradients into a [features, B * L] copy for the weight gradient, fused with
  the elementwise work before it so that every read is strided (issue 17: the MLP's fwd + bwd at
  size=tiny took a third of the time in 2-D). Merging leading axes keeps their sharding.
  """
  lead, in_shape, out_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
  x2 = x.reshape(math.prod(lead), math.prod(in_shape))
  w2 = w.reshape(math.prod(in_shape), math.prod(out_shape))
  return jax.lax.dot_general(x2, w2, (((1,), (0,)), ((), ()))).reshape(*lead, *out_shape)


def _logits(x: Array, table: Array, table_contract: int) -> Array:
  """x [..., D] . table (contracting its axis `table_contract`) -> float32 [..., vocab], as a 2-D
  product (see _contract)."""
  x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
  y = jax.lax.dot_general(x2, table, (((1,), (table_contract,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, computed in float32; returns `cfg.dtype`."""
  cfg: Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.cfg.params_dtype)
    # bf16 has too few mantissa bits for a mean of squares over thousands of features.
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (x * scale.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def inverse_frequencies(cfg: Config) -> Array:
  """float32 [head_dim/2]: the rotary frequencies, theta^(-2i/H), with `cfg.rope_scaling` applied.

  'llama3' (Llama 3.1+) divides the low frequencies -- wavelengths longer than
  rope_original_max_len / rope_low_freq_factor -- by rope_scaling_factor, keeps the high ones
  (wavelengths below rope_original_max_len / rope_high_freq_factor), and interpolates smoothly
  between, as Hugging Face `_compute_llama3_parameters` does.
  """
  h = cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if cfg.rope_scaling == "none":
    return inv_freq
  factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rotary(x: Array, positions: Array, theta: float, inv_freq: Array | None = None) -> Array:
  """Rotary position embedding, Hugging Face LLaMA "rotate-half" layout.

  Pairs feature i with feature i + head_dim/2 (not adjacent features), as HF `LlamaForCausalLM`
  does, so its q/k weights load without a permutation.

  Args:
    x: [B, L, N, H] queries or keys, any float dtype.
    positions: int [B, L] position of each token in its own document (packed rows restart at 0).
    theta: the rotary base (`rope_theta`).
    inv_freq: float32 [H/2] frequencies (`inverse_frequencies`, with scaling); None means
      theta^(-2i/H).
  Returns:
    [B, L, N, H], the dtype of `x`.
  """
  h = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)     # [H/2]
  # Angles reach max_seq_len radians: float32, never bf16 (which cannot even represent 257).
  angles = positions.astype(jnp.float32)[..., None] * inv_freq                  # [B, L, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]            # [B, L, 1, H]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(segment_ids: Array, window: int = 0, causal: bool = True,
                   prefix_len: int = 0) -> Array:
  """bool [B, 1, L, L]: query t sees key s iff s <= t, same segment, and the key is not padding.
  `causal=False` (an encoder: the two-tower family's text tower) drops the s <= t condition.
  `prefix_len` > 0 (a prefix LM: the vlm family's image tokens) also lets every query see the
  keys s < prefix_len: full attention among the prefix, the text causal and seeing the prefix.

  `segment_ids` int [B, L]: 0 is padding, equal ids are one document. Causality is by index in
  the row (positions restart per document, so they cannot order tokens of different documents).
  `window` > 0 (Mistral's sliding window) also requires t - s < window.
  """
  length = segment_ids.shape[1]
  visible = jnp.ones((length, length), dtype=jnp.bool_)
  if causal:
    visible = jnp.tril(visible)
  if window > 0:
    visible = visible & ~jnp.tril(visible, -window)
  if prefix_len > 0:
    visible = visible | (jnp.arange(length) < prefix_len)[None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real_key = (segment_ids != 0)[:, None, :]
  return (visible[None] & same & real_key)[:, None]


def cached_attention_mask(segment_ids: Array, kv_segment_ids: Array, index: Array,
                          window: int = 0, prefix_len: int = 0) -> Array:
  """bool [B, 1, L, S]: the `attention_mask` rule for L new tokens written at cache slot `index`.

  segment_ids: int [B, L] of the new tokens; kv_segment_ids: int [B, S] of every cache slot (the
  new tokens' already written, 0 for padding and for slots not written yet); index: int32 scalar.
  Query i is slot index + i: it sees slot s iff s <= index + i, same segment, s not padding;
  with `prefix_len` > 0 also every slot s < prefix_len (the prefix LM's prefix, written first).
  """
  q_slot = index + jnp.arange(segment_ids.shape[1])[:, None]           # [L, 1]
  kv_slot = jnp.arange(kv_segment_ids.shape[1])[None, :]               # [1, S]
  visible = kv_slot <= q_slot
  if window > 0:
    visible = visible & (q_slot - kv_slot < window)
  if prefix_len > 0:
    visible = visible | (kv_slot < prefix_len)
  same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  real_key = (kv_segment_ids != 0)[:, None, :]
  return (visible[None] & same & real_key)[:, None]


# Query blocks of the XLA attention path: block i of n attends only keys [0, (i + 1) * L / n), the
# rest being masked by causality; with 4 blocks 3/8 of the score matrix is never computed.
CAUSAL_BLOCKS = 4


def causal_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query attention under a causal `mask`, the math of jax.nn.dot_product_attention's
  'xla' implementation with a layout XLA runs about twice as fast on a CPU, and the upper
  triangle's key blocks skipped.

  q [B, L, N, H]; k, v [B, L, K, H] (N a multiple of K); mask bool [B, 1, L, L], which must
  already hide every key s > t from query t (`attention_mask` does). Returns [B, L, N, H].

  Why not jax.nn.dot_product_attention: it vmaps its core over the query groups, so the scores
  come out as [B, K, T, G, S] and XLA on a CPU transposes them (and their gradients) between the
  matmuls and the softmax; here the heads are brought in front once, on the small q, k, v, and
  every [.., T, S] tensor stays in one layout. Scores and softmax are float32 as there; a query
  that sees no key at all (padding) gets the average value of its block's keys rather than of all
  keys -- its output is never read (the mask hides padding keys, the loss padding queries).
  """
  batch, length, n_heads, head_dim = q.shape
  n_kv = k.shape[2]
  groups = n_heads // n_kv
  q = q.reshape(batch, length, n_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, H]
  k = k.transpose(0, 2, 1, 3)                                                     # [B, K, S, H]
  v = v.transpose(0, 2, 1, 3)
  mask = mask[:, :, None]                                                         # [B, 1, 1, T, S]
  blocks = CAUSAL_BLOCKS if length % CAUSAL_BLOCKS == 0 and length >= 32 * CAUSAL_BLOCKS else 1
  size = length // blocks
  outs = []
  for i in range(blocks):
    rows, keys = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
    outs.append(_attention_core(q[:, :, :, rows], k[:, :, keys], v[:, :, keys],
                                mask[..., rows, keys], head_dim))
  out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)                 # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, n_heads, head_dim)


def _attention_core(q: Array, k: Array, v: Array, mask: Array, head_dim: int) -> Array:
  """softmax(q k^T / sqrt(H), masked) v on q [B, K, G, T, H], k, v [B, K, S, H]: [B, K, G, T, H].

  As jax.nn.dot_product_attention's XLA core: float32 scores (bf16 inputs multiplied with float32
  accumulation), masked to -0.7 * float32 max, float32 softmax, probabilities cast to v's dtype.
  """
  if q.dtype == jnp.bfloat16:
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  elif q.dtype == jnp.float16:
    precision = jax.lax.DotAlgorithmPreset.F16_F16_F32
  else:
    precision = None
  try:
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
  except Exception:  # a platform without the preset: the default precision, as jax falls back
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(head_dim))
  logits = jnp.where(mask, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksh->bkgth", probs, v)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings: [B, L, D] -> [B, L, D].

  With `cache` (decoding) it also returns the layer's updated cache; see `Block`.
  """
  cfg: Config

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, cache: dict | None = None,
               decode: dict | None = None):
    cfg = self.cfg
    bias = cfg.qkv_bias
    q = Dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), use_bias=bias,
              name="q")(x)
    k = Dense(cfg, (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=bias, name="k")(x)
    v = Dense(cfg, (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=bias, name="v")(x)
    inv_freq = inverse_frequencies(cfg)
    q = nn.with_logical_constraint(rotary(q, positions, cfg.rope_theta, inv_freq), Q_HEADS)
    k = nn.with_logical_constraint(rotary(k, positions, cfg.rope_theta, inv_freq), KV_HEADS)
    v = nn.with_logical_constraint(v, KV_HEADS)
    if cache is None:
      # K < N heads is grouped-query attention natively: no repeat of k/v in memory.
      # The mask already holds causality; is_causal also lets cuDNN skip the upper triangle, and
      # causal_attention skips the upper triangle's key blocks.
      prefix_len = getattr(cfg, "prefix_len", 0)
      mask = attention_mask(segment_ids, cfg.sliding_window, cfg.causal, prefix_len)
      # An encoder (causal=False: every key of the segment) or a prefix LM (prefix_len > 0: keys
      # past the query inside the prefix): the mask is not causal, so no causal shortcut.
      if not cfg.causal or prefix_len:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention)
      elif cfg.attention == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                           implementation="cudnn")
      else:
        out = causal_attention(q, k, v, mask)
    else:
      k, v, cache = _write_cache(cache, k, v, decode["index"])
      mask = cached_attention_mask(segment_ids, decode["segment_ids"], decode["index"],
                                   cfg.sliding_window, getattr(cfg, "prefix_len", 0))
      # XLA, whatever cfg.attention says: the mask is not the square causal one cuDNN expects.
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    out = nn.with_logical_constraint(out, Q_HEADS)
    out = Dense(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2,
                name="o")(out)
    return out if cache is None else (out, cache)


def _write_cache(cache: dict, k: Array, v: Array, index: Array):
  """Writes k, v [B, L, K, H] into cache slots index..index+L-1; returns (keys, values, cache).

  keys/values are the whole cache [B, S, K, H] after the write, in the cache's dtype.
  """
  start = (0, index, 0, 0)
  keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
  values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
  keys = nn.with_logical_constraint(keys, KV_HEADS)
  values = nn.with_logical_constraint(values, KV_HEADS)
  return keys, values, {"k": keys, "v": values}


class Mlp(nn.Module):
  """SwiGLU feed-forward: wo(silu(x @ wi_gate) * (x @ wi_up)), [B, L, D] -> [B, L, D]."""
  cfg: Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    gate = Dense(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="wi_gate")(x)
    up = Dense(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="wi_up")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, MLP_HIDDEN)
    return Dense(cfg, (cfg.d_model,), ("mlp", "embed"), name="wo")(hidden)


class Block(nn.Module):
  """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)).

  Returns (x, None): a scan carry and no per-layer output, so `nn.scan` takes the class as is.
  Decoding passes this layer's `cache` {'k', 'v': [B, S, K, H]} (scanned over layers) and the
  shared `decode` {'index': int32 scalar, 'segment_ids': int32 [B, S]} (broadcast); the block then
  returns (x, updated cache).
  """
  cfg: Config

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, cache: dict | None = None,
               decode: dict | None = None) -> tuple[Array, dict | None]:
    cfg = self.cfg
    h = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x), positions,
                                         segment_ids, cache, decode)
    if cache is not None:
      h, cache = h
    x = nn.with_logical_constraint(x + h, RESIDUAL)
    h = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x + h, RESIDUAL)
    return x, cache


class Embed(nn.Module):
  """The token table [vocab, D]: `__call__` looks tokens up; `attend` is the tied output layer."""
  cfg: Config

  def setup(self):
    std = self.cfg.d_model ** -0.5 if self.cfg.tie_embeddings else 1.0
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "embed")),
        (self.cfg.vocab_size, self.cfg.d_model), self.cfg.params_dtype)

  def __call__(self, tokens: Array) -> Array:
    """int [B, L] -> [B, L, D] in `cfg.dtype` (gather first: cheaper than casting the table)."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x: Array) -> Array:
    """[B, L, D] -> float32 logits [B, L, vocab]."""
    table = self.embedding.astype(self.cfg.compute_dtype)
    return _logits(x, table, 1)


class Unembed(nn.Module):
  """The untied output projection, kernel [D, vocab]: [B, L, D] -> float32 logits [B, L, vocab]."""
  cfg: Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, ("embed", "vocab")),
                        (self.cfg.d_model, self.cfg.vocab_size), self.cfg.params_dtype)
    # Multiply in the compute dtype, accumulate and return float32: the softmax needs the precision.
    kernel = kernel.astype(self.cfg.compute_dtype)
    return _logits(x, kernel, 0)


class ClassifierHead(nn.Module):
  """Class logits from pooled features: x [B, D] @ kernel [D, num_classes] + bias -> float32 [B, C].

  Zero-initialised (as big_vision's transfer heads): the new head starts at the uniform
  prediction, loss log(num_classes), so its first steps do not push random gradients into a
  pre-trained backbone.
  """
  cfg: Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed", None)),
                        (x.shape[-1], cfg.num_classes), cfg.params_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                      (cfg.num_classes,), cfg.params_dtype)
    logits = jnp.einsum("bd,dc->bc", x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)
