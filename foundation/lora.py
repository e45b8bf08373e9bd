"""LoRA (Hu et al. 2021) as a parameter transform, for any family.

The model knows nothing of adapters. `add_adapters` puts two small leaves beside each targeted
kernel of the (boxed) param tree at init:

  .../q/kernel [*lead, *in, *out]    the frozen base
  .../q/lora_a [*lead, *in, rank]    fan-in scaled normal
  .../q/lora_b [*lead, rank, *out]   zeros, so the adapted model starts as the base

and `model_params` turns that tree into the model's own, every kernel W + (alpha / rank) * A @ B,
inside the jitted step (the step differentiates through it, so only A and B get gradients that
matter; the trainable mask, foundation/finetune.py, keeps the base from updating). The same
function folds the adapters in for generation, evaluation and export (`merge`).

Which kernels: `lora.targets`, a regex searched in each kernel's module path ('layers/attn/q');
'attn/(q|v)$' is the LoRA paper's choice, '(attn|mlp)/\\w+$' every projection of a block.
Which axes are the input: from the kernel's logical names. A leading 'layers' axis (scanned
layers) is carried along; if the first other axis is 'embed' the kernel reads the model width
(q, k, v, an MLP's input: in = that axis), else if the last is 'embed' it writes it (o, an MLP's
output: in = every axis before it); otherwise the first axis is the input.

Cost: the merged kernels are made in each step, a transient copy of the targeted weights (for
'attn/(q|v)$' about a sixth of a decoder's); adapter dropout has no place in a weight transform
and is not offered.
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

LEAVES = ("lora_a", "lora_b")
LEAD_AXIS = "layers"   # the scanned-layers axis some families put in front of a block's params


def enabled(config) -> bool:
  return config.get("lora", {}).get("rank", 0) > 0


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_adapter(path) -> bool:
  """Whether the param at `path` (a tree path or 'a/b/c' string) is an adapter leaf."""
  names = path.split("/") if isinstance(path, str) else _names(path)
  return any(n in LEAVES for n in names)


def split_axes(names: tuple) -> tuple[int, int]:
  """(lead, n_in) of a kernel from its logical axis names (see the module docstring)."""
  names = tuple(names)
  lead = 0
  while lead < len(names) and names[lead] == LEAD_AXIS:
    lead += 1
  rest = names[lead:]
  if len(rest) < 2:
    raise ValueError(f"a kernel with axes {names} has no input and output axes to adapt")
  if rest[0] != "embed" and rest[-1] == "embed":
    return lead, len(rest) - 1
  return lead, 1


def check(config) -> None:
  """lora.* fields: one-line errors naming the field."""
  if "lora" not in config:
    return
  lo = config.lora
  if lo.rank < 0:
    raise ValueError(f"lora.rank={lo.rank} must be >= 0 (0: no adapters)")
  if lo.rank and not lo.alpha > 0:
    raise ValueError(f"lora.alpha={lo.alpha} must be > 0")
  try:
    re.compile(lo.targets)
  except re.error as e:
    raise ValueError(f"lora.targets={lo.targets!r} is not a regular expression: {e}") from None


def add_adapters(boxed_params: Any, config, rng: jax.Array) -> Any:
  """The boxed (nn.Partitioned) init params with lora_a and lora_b beside every kernel whose
  module path matches lora.targets; unchanged without LoRA. Raises ValueError naming
  lora.targets when it matches no kernel."""
  if not enabled(config):
    return boxed_params
  lo = config.lora
  pattern = re.compile(lo.targets)
  kernels = []

  def walk(node, path):
    if not isinstance(node, dict):
      return node
    out = {k: walk(v, (*path, k)) for k, v in node.items()}
    kernel = node.get("kernel")
    module = "/".join(path)
    if isinstance(kernel, nn.Partitioned) and pattern.search(module):
      kernels.append(module)
      key = jax.random.fold_in(rng, len(kernels))
      out.update(_adapter(kernel, lo.rank, key))
    return out

  params = walk(dict(boxed_params), ())
  if not kernels:
    modules = sorted({"/".join(_names(p)[:-1]) for p, x in jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)) if _names(p)[-1] ==
        "kernel"})
    raise ValueError(f"lora.targets={lo.targets!r} matches no kernel; the model's are "
                     f"{', '.join(modules[:12])}{' ...' if len(modules) > 12 else ''}")
  return params


def _adapter(kernel: nn.Partitioned, rank: int, rng) -> dict:
  """{'lora_a', 'lora_b'} for one boxed kernel: logical names follow the kernel's, the rank axis
  is replicated (None)."""
  value, names = kernel.value, tuple(kernel.names)
  lead, n_in = split_axes(names)
  in_shape = value.shape[lead:lead + n_in]
  a_shape = (*value.shape[:lead + n_in], rank)
  b_shape = (*value.shape[:lead], rank, *value.shape[lead + n_in:])
  a = jax.random.truncated_normal(rng, -2.0, 2.0, a_shape, jnp.float32)
  # Truncated at 2 std the normal's std is 0.88; divided out so A's std is 1 / sqrt(fan_in).
  a = (a / (0.87962566103423978 * math.sqrt(math.prod(in_shape)))).astype(value.dtype)
  # Boxed as the kernel is (logical names, nn.LogicallyPartitioned), only the names differ.
  return {"lora_a": kernel.replace(value=a, names=(*names[:lead + n_in], None)),
          "lora_b": kernel.replace(value=jnp.zeros(b_shape, value.dtype),
                                   names=(*names[:lead], None, *names[lead + n_in:]))}


def _merge_node(node: dict, scale: float) -> dict:
  """{'kernel', 'lora_a', 'lora_b', ...} -> {'kernel': W + scale * A @ B, ...} (float32 product).

  kernel [*lead, *in, *out], lora_a [*lead, *in, r], lora_b [*lead, r, *out]: the axis counts
  follow from the three shapes."""
  kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  n_in = a.ndim - 1 - lead
  a2 = a.reshape(*a.shape[:lead], math.prod(a.shape[lead:lead + n_in]), a.shape[-1])
  b2 = b.reshape(*b.shape[:lead + 1], -1)
  delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(kernel.shape)
  merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return {**{k: v for k, v in node.items() if k not in LEAVES}, "kernel": merged}


def merge(params: Any, alpha: float) -> Any:
  """The params with every adapter folded into its kernel and the adapter leaves removed: the
  model's own tree. The rank is read from each adapter; a tree without adapters is returned
  as it is."""
  def walk(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node:
      return _merge_node(node, alpha / node["lora_a"].shape[-1])
    return {k: walk(v) for k, v in node.items()}
  return walk(dict(params)) if isinstance(params, dict) else params


def model_params(params: Any, config) -> Any:
  """The params the model is applied to: adapters merged under LoRA, else `params` itself."""
  return merge(params, config.lora.alpha) if enabled(config) else params


def adapters(params: Any) -> Any:
  """Only the adapter leaves, nested as in `params` (what serving keeps per fine-tune)."""
  if not isinstance(params, dict):
    return None
  out = {}
  for k, v in params.items():
    if k in LEAVES:
      out[k] = v
    else:
      sub = adapters(v)
      if sub:
        out[k] = sub
  return out


def attach(base: Any, adapter_tree: Any) -> Any:
  """`base` params with `adapter_tree`'s leaves (`adapters`) put back beside their kernels, so
  several fine-tunes share one base in memory."""
  if not isinstance(adapter_tree, dict):
    return base
  out = dict(base)
  for k, v in adapter_tree.items():
    out[k] = v if k in LEAVES else attach(base[k], v)
  return out


def targets_from_names(names: str) -> str:
  """An old workdir's model.lora_targets ('q,v', 'attn', 'all') as a lora.targets regex."""
  groups = {"attn": ("q", "k", "v", "o"), "mlp": ("wi_gate", "wi_up", "wo")}
  groups["all"] = groups["attn"] + groups["mlp"]
  parts = []
  for part in filter(None, (p.strip() for p in names.split(","))):
    parts.extend(groups.get(part, (part,)))
  return f"(attn|mlp)/({'|'.join(parts)})$"
