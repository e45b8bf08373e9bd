"""The decoder-only LM against an independent numpy reference, and its invariances.

CPU, float32 (size=test); nothing here depends on the number of devices.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from foundation.models import layers
from foundation.models import transformer


def model_config(**overrides) -> transformer.ModelConfig:
  cfg = lm.get_config("size=test").model
  cfg.unlock()
  cfg.update(overrides)
  return transformer.ModelConfig.from_config(cfg)


def pack(rows: list[list[int]], length: int, seed: int = 0):
  """tokens/positions/segment_ids int32 [len(rows), length]; each row is a list of document lengths.

  Padding gets random (non-zero) tokens too, to show that padding content is ignored.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 256, (len(rows), length)).astype(np.int32)
  positions = np.zeros((len(rows), length), np.int32)
  segments = np.zeros((len(rows), length), np.int32)
  for b, docs in enumerate(rows):
    start = 0
    for seg, n in enumerate(docs, start=1):
      positions[b, start:start + n] = np.arange(n)
      segments[b, start:start + n] = seg
      start += n
  return tokens, positions, segments


# Compiles dominate this file's time on a small CPU: share one jitted init and apply per config.

@functools.lru_cache
def init(mcfg: transformer.ModelConfig):
  """Boxed variables ({'params': nn.Partitioned ...}) for a [2, 16] batch."""
  zeros = jnp.zeros((2, 16), jnp.int32)
  return jax.jit(transformer.Transformer(mcfg).init)(jax.random.key(0), zeros, zeros, zeros)


@functools.lru_cache
def jitted_apply(mcfg: transformer.ModelConfig):
  return jax.jit(transformer.Transformer(mcfg).apply)


def apply(mcfg, params, batch):
  return jitted_apply(mcfg)({"params": params}, *batch)


def params_of(mcfg):
  return nn.unbox(init(mcfg))["params"]


def unstack_layers(params, n_layers):
  """Scanned layout (params['layers'] with a leading layer axis) -> layers_0 ... layers_{n-1}."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(n_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


# --------------------------------------------------------------------------------------------------
# An independent reference: numpy float64, explicit loops where the model uses a trick.

def ref_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rotary(x, positions, theta):
  """HF LLaMA: feature i pairs with i + H/2, rotated by position * theta^(-2i/H)."""
  h = x.shape[-1]
  out = np.empty_like(x)
  for i in range(h // 2):
    angle = positions[:, :, None] * theta ** (-2.0 * i / h)
    a, b = x[..., i], x[..., i + h // 2]
    out[..., i] = a * np.cos(angle) - b * np.sin(angle)
    out[..., i + h // 2] = b * np.cos(angle) + a * np.sin(angle)
  return out


def ref_mask(segments):
  batch, length = segments.shape
  mask = np.zeros((batch, length, length), bool)
  for b in range(batch):
    for t in range(length):
      for s in range(t + 1):
        mask[b, t, s] = segments[b, t] == segments[b, s] != 0
  return mask


def ref_attention(p, x, positions, segments, cfg):
  q = ref_rotary(np.einsum("bld,dnh->blnh", x, p["q"]["kernel"]), positions, cfg.rope_theta)
  k = ref_rotary(np.einsum("bld,dkh->blkh", x, p["k"]["kernel"]), positions, cfg.rope_theta)
  v = np.einsum("bld,dkh->blkh", x, p["v"]["kernel"])
  group = cfg.n_heads // cfg.n_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # HF repeat_kv
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim)
  mask = ref_mask(segments)[:, None]
  scores = np.where(mask, scores - scores.max(-1, keepdims=True), -np.inf)
  probs = np.exp(scores)
  # A padding query sees no key: give it zeros, not NaN, so NaN never reaches the next layer's keys.
  probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-30)
  out = np.einsum("bnts,bsnh->btnh", probs, v)
  return np.einsum("blnh,nhd->bld", out, p["o"]["kernel"])


def ref_logits(params, cfg, tokens, positions, segments):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed"]["embedding"][tokens]
  for i in range(cfg.n_layers):
    lp = p[f"layers_{i}"]
    h = ref_rms_norm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
    x = x + ref_attention(lp["attn"], h, positions, segments, cfg)
    h = ref_rms_norm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
    gate, up = h @ lp["mlp"]["wi_gate"]["kernel"], h @ lp["mlp"]["wi_up"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["mlp"]["wo"]["kernel"]
  x = ref_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
  out = p["embed"]["embedding"].T if cfg.tie_embeddings else p["output"]["kernel"]
  return x @ out


# --------------------------------------------------------------------------------------------------

BATCH = pack([[5, 7], [12]], 16)  # two documents and padding; one document and padding


@pytest.mark.parametrize("tied", [False, True])
def test_matches_reference(tied):
  mcfg = model_config(tie_embeddings=tied)
  params = params_of(mcfg)
  assert ("output" in params) != tied  # a tied model has no output kernel
  logits = apply(mcfg, params, BATCH)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, mcfg.vocab_size)
  assert np.isfinite(logits).all()  # padding rows see no key at all: still no NaN
  want = ref_logits(unstack_layers(params, mcfg.n_layers), mcfg, *BATCH)
  real = BATCH[2] != 0  # padding queries attend to nothing: their output is not defined
  np.testing.assert_allclose(np.asarray(logits)[real], want[real], rtol=1e-5, atol=1e-5)
  # The init keeps the first logits near unit scale in both layouts (see layers.py).
  assert 0.3 < float(np.std(want[real])) < 3.0


def test_packed_document_equals_alone():
  mcfg = model_config()
  # Row 0: the document alone. Row 1: the same document second, between two others, then padding.
  tokens, positions, segments = pack([[6], [5, 6, 3]], 16)
  tokens[1, 5:11] = tokens[0, :6]
  logits = apply(mcfg, params_of(mcfg), (tokens, positions, segments))
  np.testing.assert_allclose(logits[1, 5:11], logits[0, :6], rtol=1e-5, atol=1e-5)


def test_scan_equals_loop():
  scan_cfg, loop_cfg = model_config(scan_layers=True), model_config(scan_layers=False)
  params = params_of(scan_cfg)
  loop_params = unstack_layers(params, scan_cfg.n_layers)
  zeros = jnp.zeros((2, 16), jnp.int32)
  loop_shapes = jax.eval_shape(
      transformer.Transformer(loop_cfg).init, jax.random.key(0), *[zeros] * 3)
  assert jax.tree.map(jnp.shape, loop_params) == jax.tree.map(
      jnp.shape, nn.unbox(loop_shapes)["params"])
  np.testing.assert_allclose(apply(scan_cfg, params, BATCH), apply(loop_cfg, loop_params, BATCH),
                             rtol=1e-6, atol=1e-6)


def loss_and_grads(mcfg, params):
  """Mean next-token cross-entropy over real tokens, and its gradient."""
  tokens, positions, segments = BATCH
  targets = np.roll(tokens, -1, axis=1)
  model = transformer.Transformer(mcfg)

  def loss_fn(params):
    logp = jax.nn.log_softmax(model.apply({"params": params}, tokens, positions, segments))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * (segments != 0)) / jnp.sum(segments != 0)

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_remat_policies_agree():
  params = params_of(model_config())
  loss, grads = loss_and_grads(model_config(), params)
  # Scan with each policy; the loop (prevent_cse=True) with 'dots', its grads stacked back.
  for scan, policy in ((True, "full"), (True, "dots"), (True, "minimal"), (False, "dots")):
    mcfg = model_config(scan_layers=scan, remat_policy=policy)
    other_loss, other_grads = loss_and_grads(
        mcfg, params if scan else unstack_layers(params, mcfg.n_layers))
    if not scan:
      layer_grads = [other_grads.pop(f"layers_{i}") for i in range(mcfg.n_layers)]
      other_grads["layers"] = jax.tree.map(lambda *g: jnp.stack(g), *layer_grads)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 other_grads, grads)


EXPECTED_NAMES = {
    "embed/embedding": ("vocab", "embed"),
    "attn/q/kernel": ("embed", "heads", "head_dim"),
    "attn/k/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/v/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/o/kernel": ("heads", "head_dim", "embed"),
    "mlp/wi_gate/kernel": ("embed", "mlp"),
    "mlp/wi_up/kernel": ("embed", "mlp"),
    "mlp/wo/kernel": ("mlp", "embed"),
    "attn_norm/scale": ("embed",),
    "mlp_norm/scale": ("embed",),
    "final_norm/scale": ("embed",),
    "output/kernel": ("embed", "vocab"),
}


@pytest.mark.parametrize("scan", [True, False])
def test_every_param_has_logical_names(scan):
  mcfg = model_config(scan_layers=scan)
  batch = pack([[16]], 16)
  abstract = jax.eval_shape(transformer.Transformer(mcfg).init, jax.random.key(0), *batch)
  specs = nn.get_partition_spec(abstract)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract)["params"])
  assert len(leaves) == 9 * mcfg.n_layers ** (not scan) + 3
  rule_names = {name for name, _ in lm.get_config("size=test").mesh.rules}
  for path, leaf in leaves:
    keys = [k.key for k in path]
    spec = specs
    for k in keys:
      spec = spec[k]
    name = "/".join(keys[1:] if keys[0].startswith("layers") else keys)
    want = EXPECTED_NAMES[name]
    if keys[0] == "layers":
      want = ("layers", *want)
    assert tuple(spec) == want, name
    assert len(spec) == leaf.ndim, name
    assert set(spec) <= rule_names, name
  activations = (layers.RESIDUAL, layers.Q_HEADS, layers.KV_HEADS, layers.MLP_HIDDEN, layers.LOGITS)
  assert set(sum(activations, ())) <= rule_names


def test_sharded_apply_matches_unsharded():
  """Logical rules + a mesh (tensor-parallel over up to 2 devices) do not change the function."""
  mcfg = model_config()
  rules = lm.get_config("size=test").mesh.rules
  n = min(2, jax.device_count())
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(1, 1, 1, n),
                           ("data", "fsdp", "sequence", "tensor"))
  boxed = init(mcfg)
  with nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    variables = jax.device_put(nn.unbox(boxed), nn.unbox(shardings))
    with jax.set_mesh(mesh):
      got = jax.jit(transformer.Transformer(mcfg).apply)(variables, *BATCH)
  assert variables["params"]["output"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")
  want = apply(mcfg, params_of(mcfg), BATCH)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute():
  f32_cfg, bf16_cfg = model_config(), model_config(dtype="bfloat16")
  zeros = jnp.zeros((2, 16), jnp.int32)
  bf16_params = jax.eval_shape(
      transformer.Transformer(bf16_cfg).init, jax.random.key(0), *[zeros] * 3)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_params))  # params stay float32
  params = params_of(f32_cfg)
  got = apply(bf16_cfg, params, BATCH)
  want = apply(f32_cfg, params, BATCH)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got) - np.asarray(want))[BATCH[2] != 0]
  assert err.max() < 0.15 and err.mean() < 0.03, (err.max(), err.mean())


def test_flops_per_token():
  mcfg = model_config()  # d=64, 2 layers, 4 heads, 2 kv heads, head_dim 16, mlp 128, vocab 384
  per_layer = (64 * 4 * 16 * 2       # q, o
               + 64 * 2 * 16 * 2     # k, v
               + 3 * 64 * 128        # wi_gate, wi_up, wo
               + 2 * 64)             # two norm scales
  n = 2 * per_layer + 64 + 64 * 384  # + final norm + output kernel = 98_624
  assert transformer.non_embedding_params(mcfg) == n == 98_624
  assert transformer.flops_per_token(mcfg, 32) == 6 * n + 12 * 2 * 4 * 16 * 32 == 640_896
  assert transformer.flops_per_token(mcfg, 32, causal=True) == 6 * n + 6 * 2 * 4 * 16 * 32
  # N is every param but the input table; a tied table is counted once, as the output projection.
  for tied in (False, True):
    mcfg = model_config(tie_embeddings=tied)
    params = jax.eval_shape(
        transformer.Transformer(mcfg).init, jax.random.key(0), *pack([[16]], 16))
    input_table = 0 if tied else mcfg.vocab_size * mcfg.d_model
    assert transformer.count_params(params) - input_table == transformer.non_embedding_params(mcfg)


def test_model_config():
  mcfg = model_config()
  assert hash(mcfg) == hash(model_config()) and mcfg.compute_dtype == jnp.float32
  with pytest.raises(ValueError, match="n_kv_heads=3"):
    model_config(n_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy='some'"):
    model_config(remat_policy="some")
