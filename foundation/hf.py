r"""Hugging Face interop: LLaMA-family weights (Llama, Mistral, Qwen2) in and out.

  # HF checkpoint -> a workdir that foundation.generate / foundation.evaluate read (and the trainer
  # can start from): config.json + checkpoints/0/ (Orbax, sharded)
  python -m foundation.hf import --source path/to/Llama-3.2-1B --workdir runs/llama1b
  # a workdir's checkpoint -> HF safetensors + config.json (transformers' from_pretrained reads it)
  python -m foundation.hf export --workdir runs/tiny --out runs/tiny-hf [--dtype bfloat16]

`--source` is a transformers checkpoint folder (config.json with model.safetensors, or shards and
model.safetensors.index.json), a .safetensors file or an index .json (config.json beside it).

Loading never holds the model on one device, nor on the host beyond what each device's shard
needs: every param is built by `jax.make_array_from_callback` in its target sharding, and each
device's callback reads only its own block of the HF tensors (safetensors slices are lazy reads of
a memory map), converting layout and dtype on the fly. Exporting gathers one layer's tensor at a
time and writes shards of at most `max_shard_bytes`.

Layout: HF `nn.Linear` weights are [out, in]; our kernels are [in, out] with heads split out, e.g.
q_proj [N*H, D] -> attn/q/kernel [D, N, H], o_proj [D, N*H] -> attn/o/kernel [N, H, D]. HF LLaMA
rotary uses the same rotate-half pairing as ours (foundation/models/layers.py), so q/k need no
permutation. With scan_layers the layers are stacked on a leading axis.

The tokenizer.json reader is foundation/data/tokenizers.py's HFTokenizer: the data pipeline, the
generator and the evaluator all use it through `data.tokenizer`.
"""

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import numpy as np

from foundation import config as config_lib
from foundation.data import tokenizers
from foundation.models import transformer

# model_type -> the HF class our architecture matches.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# Tensors of some checkpoints that hold no weights (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedModelError(ValueError):
  """The HF checkpoint is of an architecture or variant that foundation cannot represent."""


class WeightShapeError(ValueError):
  """An HF tensor's shape disagrees with its config.json (the message names both)."""


# ------------------------------------------------------------------ config.json <-> ModelConfig

def read_json(path: str) -> dict:
  """A JSON object file; one-line errors naming it when it is missing or not a JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
  return value


def _rope(hf: dict) -> tuple[float, dict]:
  """(rope_theta, scaling dict or {}) from either the transformers<5 or the >=5 config layout."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return float(theta), ({} if kind in ("default", None) else {**scaling, "rope_type": kind})


def model_fields(hf: dict) -> dict:
  """ModelConfig fields (config.model) from an HF config.json; unsupported variants raise."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or [ARCHITECTURES.get(model_type, "?")]
  if model_type not in ARCHITECTURES or archs[0] != ARCHITECTURES[model_type]:
    raise UnsupportedModelError(
        f"config.json: model_type={model_type!r}, architectures={archs} is not supported; "
        f"foundation imports {', '.join(ARCHITECTURES.values())}")
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedModelError(f"config.json: hidden_act={hf['hidden_act']!r}; only 'silu' "
                                f"(SwiGLU) is supported")
  if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise UnsupportedModelError(
        f"config.json: attention_bias={hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')}:"
        f" Llama's attention_bias puts biases on q_proj, k_proj, v_proj and o_proj (mlp_bias on "
        f"the MLP); foundation has q/k/v biases only (Qwen2's layout), none on o_proj or the MLP")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise UnsupportedModelError("config.json: Qwen2 use_sliding_window=true (sliding attention "
                                "on some layers only) is not supported")
  theta, scaling = _rope(hf)
  if scaling and scaling["rope_type"] != "llama3":
    raise UnsupportedModelError(f"config.json: rope_scaling type {scaling['rope_type']!r} is not "
                                f"supported (supported: none, 'llama3')")
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      sliding_window=int(hf.get("sliding_window") or 0) if model_type == "mistral" else 0)
  if scaling:
    fields.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                  rope_low_freq_factor=float(scaling["low_freq_factor"]),
                  rope_high_freq_factor=float(scaling["high_freq_factor"]),
                  rope_original_max_len=int(scaling["original_max_position_embeddings"]))
  return fields


def hf_config(cfg: transformer.ModelConfig, model_type: str | None = None, dtype: str = "float32",
              bos_id: int | None = None, eos_id: int | None = None) -> dict:
  """An HF config.json for `cfg`. model_type None picks: qwen2 with q/k/v biases, mistral with a
  sliding window, else llama."""
  if model_type is None:
    model_type = "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
  if model_type not in ARCHITECTURES:
    raise UnsupportedModelError(f"model_type={model_type!r}: export supports {list(ARCHITECTURES)}")
  if cfg.qkv_bias != (model_type == "qwen2") or (cfg.sliding_window and model_type != "mistral"):
    raise UnsupportedModelError(
        f"model_type={model_type!r} cannot hold qkv_bias={cfg.qkv_bias}, "
        f"sliding_window={cfg.sliding_window} (q/k/v biases: qwen2; a sliding window: mistral)")
  out = {
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
      "bos_token_id": bos_id, "eos_token_id": eos_id}
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len}
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "mistral":
    out["sliding_window"] = cfg.sliding_window or None
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# ------------------------------------------------------------------ the tensor mapping

@dataclasses.dataclass(frozen=True)
class Mapping:
  """One of our params <-> one HF tensor (per layer when `layered`).

  The HF tensor, reshaped to `view` (the HF axes split into `groups`: e.g. q_proj's out axis N*H
  into (N, H)), transposed by `perm`, is our param. `hf` has `{i}` for the layer number.
  """
  hf: str
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  layered: bool = False

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def view(self) -> tuple[int, ...]:
    return tuple(n for g in self.groups for n in g)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.view[a] for a in self.perm)


def mappings(cfg: transformer.ModelConfig) -> dict[tuple[str, ...], Mapping]:
  """Our param path (inside one block for layered ones) -> its HF tensor."""
  d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, \
      cfg.vocab_size
  layer = "model.layers.{i}."

  def linear(name, out, inp):  # nn.Linear weight [out, in] -> our kernel [*in, *out]
    return Mapping(layer + name + ".weight", (out, inp),
                   tuple(range(len(out), len(out) + len(inp))) + tuple(range(len(out))), True)

  def vector(name, shape):
    return Mapping(layer + name, (shape,), tuple(range(len(shape))), True)

  table = {
      ("attn_norm", "scale"): vector("input_layernorm.weight", (d,)),
      ("attn", "q", "kernel"): linear("self_attn.q_proj", (n, h), (d,)),
      ("attn", "k", "kernel"): linear("self_attn.k_proj", (k, h), (d,)),
      ("attn", "v", "kernel"): linear("self_attn.v_proj", (k, h), (d,)),
      ("attn", "o", "kernel"): linear("self_attn.o_proj", (d,), (n, h)),
      ("mlp_norm", "scale"): vector("post_attention_layernorm.weight", (d,)),
      ("mlp", "wi_gate", "kernel"): linear("mlp.gate_proj", (f,), (d,)),
      ("mlp", "wi_up", "kernel"): linear("mlp.up_proj", (f,), (d,)),
      ("mlp", "wo", "kernel"): linear("mlp.down_proj", (d,), (f,)),
  }
  if cfg.qkv_bias:
    for name, heads in (("q", n), ("k", k), ("v", k)):
      table[("attn", name, "bias")] = vector(f"self_attn.{name}_proj.bias", (heads, h))
  table[("embed", "embedding")] = Mapping("model.embed_tokens.weight", ((v,), (d,)), (0, 1))
  table[("final_norm", "scale")] = Mapping("model.norm.weight", ((d,),), (0,))
  if not cfg.tie_embeddings:
    table[("output", "kernel")] = Mapping("lm_head.weight", ((v,), (d,)), (1, 0))
  return table


def _leaf_mapping(table, path: tuple[str, ...], n_layers: int) -> tuple[Mapping, list[int] | None]:
  """(mapping, layers) for one of our leaves: layers [0..n) when stacked (scan), [i] for
  `layers_i` (loop), None for a top-level param."""
  head, rest = path[0], tuple(path[1:])
  if head == "layers":
    return table[rest], list(range(n_layers))
  if head.startswith("layers_"):
    return table[rest], [int(head.split("_")[1])]
  return table[path], None


def _names(mapping: Mapping, n_layers: int) -> list[str]:
  return [mapping.hf.format(i=i) for i in range(n_layers)] if mapping.layered else [mapping.hf]


# ------------------------------------------------------------------ reading safetensors

def checkpoint_files(source: str) -> tuple[list[str], str]:
  """(safetensors files, config.json path) of an HF checkpoint folder, file or index."""
  if not os.path.exists(source):
    raise FileNotFoundError(f"--source {source}: no such file or folder")
  folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
  config = os.path.join(folder, "config.json")
  if os.path.isdir(source):
    index = os.path.join(source, "model.safetensors.index.json")
    single = os.path.join(source, "model.safetensors")
    if os.path.exists(index):
      source = index
    elif os.path.exists(single):
      source = single
    else:
      found = sorted(os.listdir(source))
      raise FileNotFoundError(
          f"{source} holds neither model.safetensors nor model.safetensors.index.json (found "
          f"{found[:10]}); foundation reads safetensors only: convert a pytorch_model.bin with "
          f"transformers' save_pretrained(..., safe_serialization=True)")
  if source.endswith(".json"):
    weight_map = read_json(source).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{source} has no 'weight_map' object: it is not a safetensors index")
    shards = sorted(set(weight_map.values()))
    files = [os.path.join(folder, s) for s in shards]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f"{missing[0]}: no such file, though {source} lists it "
                              f"({len(missing)} of {len(files)} shards missing)")
  else:
    files = [source]
  if not os.path.exists(config):
    raise FileNotFoundError(f"no config.json beside {source}: the HF config is needed")
  return files, config


class Weights:
  """The tensors of safetensors files, opened lazily (memory-mapped): shape and block reads."""

  def __init__(self, files: Sequence[str]):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self.where, self._open = {}, {}
    for path in files:
      try:
        self._open[path] = safe_open(path, framework="np")
      except Exception as e:  # pylint: disable=broad-except  # safetensors' own error type
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
      for name in self._open[path].keys():
        self.where[name] = path

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open[self.where[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """A block of tensor `name`: only these bytes are read from the file."""
    return self._open[self.where[name]].get_slice(name)[index]


def check_weights(weights: Weights, cfg: transformer.ModelConfig, hf: dict) -> None:
  """Every tensor the config implies is present with its shape, and no other weight is there."""
  sizes = (f"hidden_size={cfg.d_model}, num_attention_heads={cfg.n_heads}, num_key_value_heads="
           f"{cfg.n_kv_heads}, head_dim={cfg.head_dim}, intermediate_size={cfg.mlp_dim}, "
           f"vocab_size={cfg.vocab_size}")
  expected = {}
  for mapping in mappings(cfg).values():
    for name in _names(mapping, cfg.n_layers):
      expected[name] = mapping.hf_shape
  for name, shape in expected.items():
    if name not in weights.where:
      raise WeightShapeError(f"the checkpoint has no tensor {name}, which config.json "
                             f"({hf.get('model_type')}, {cfg.n_layers} layers) implies")
    if weights.shape(name) != shape:
      raise WeightShapeError(
          f"tensor {name} in {os.path.basename(weights.where[name])} has shape "
          f"{weights.shape(name)}, but config.json implies {shape} ({sizes})")
  # A tied checkpoint may still store lm_head (a copy of the table); transformers ignores it too.
  extra = sorted(n for n in weights.where if n not in expected and not n.endswith(
      IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise UnsupportedModelError(
        f"the checkpoint has {len(extra)} tensor(s) this architecture has no place for, e.g. "
        f"{extra[:3]}: config.json may not describe these weights")


def _block(weights: Weights, mapping: Mapping, name: str, index: Sequence[slice]) -> np.ndarray:
  """Our param's block `index` (slices of our axes) from HF tensor `name`, our layout."""
  view_index = [None] * len(mapping.view)
  for ours, axis in enumerate(mapping.perm):
    view_index[axis] = index[ours]
  hf_index, shape, rest, axis = [], [], [], 0
  for group in mapping.groups:
    # Read whole rows of the group's inner axes; cut those in numpy after the reshape.
    first, inner = view_index[axis], math.prod(group[1:])
    hf_index.append(slice(first.start * inner, first.stop * inner))
    shape += [first.stop - first.start, *group[1:]]
    rest += [slice(None), *view_index[axis + 1:axis + len(group)]]
    axis += len(group)
  block = weights.read(name, tuple(hf_index)).reshape(shape)[tuple(rest)]
  return block.transpose(mapping.perm)


def _callback(weights, mapping, layers, shape, dtype) -> Callable:
  def read(index):
    index = [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]
    if layers is None:
      return _block(weights, mapping, mapping.hf, index).astype(dtype)
    if len(layers) == 1:  # a `layers_i` leaf of the loop layout
      return _block(weights, mapping, mapping.hf.format(i=layers[0]), index).astype(dtype)
    return np.stack([_block(weights, mapping, mapping.hf.format(i=i), index[1:]).astype(dtype)
                     for i in range(index[0].start, index[0].stop)])
  return read


def load_params(source: str, cfg: transformer.ModelConfig, target) -> Any:
  """The params of an HF checkpoint, each born in its target sharding.

  target: our param tree of jax.ShapeDtypeStruct with `sharding` (e.g.
  generate.abstract_params: the training shardings); its dtypes are the params' dtypes.
  """
  files, config_path = checkpoint_files(source)
  hf = read_json(config_path)
  weights = Weights(files)
  check_weights(weights, cfg, hf)
  table = mappings(cfg)

  def load(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    mapping, layers = _leaf_mapping(table, keys, cfg.n_layers)
    return jax.make_array_from_callback(
        leaf.shape, leaf.sharding, _callback(weights, mapping, layers, leaf.shape, leaf.dtype))

  return jax.tree_util.tree_map_with_path(load, target)


# ------------------------------------------------------------------ export

def _to_host(x) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def hf_tensors(params, cfg: transformer.ModelConfig) -> list[tuple[str, tuple, Callable]]:
  """[(HF name, HF shape, () -> numpy array)] for our params; each call gathers one tensor."""
  table, out = mappings(cfg), []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    mapping, layers = _leaf_mapping(table, keys, cfg.n_layers)
    inverse = tuple(np.argsort(mapping.perm))

    def to_hf(array, mapping=mapping, inverse=inverse):
      return np.ascontiguousarray(np.asarray(array).transpose(inverse).reshape(mapping.hf_shape))

    if layers is None or len(layers) == 1:
      name = mapping.hf.format(i=layers[0]) if layers else mapping.hf
      out.append((name, mapping.hf_shape, lambda leaf=leaf, f=to_hf: f(_to_host(leaf))))
    else:
      for i in layers:  # one layer at a time: the host never holds a whole stacked param
        out.append((mapping.hf.format(i=i), mapping.hf_shape,
                    lambda leaf=leaf, i=i, f=to_hf: f(_to_host(leaf[i]))))
  return out


def export_params(params, cfg: transformer.ModelConfig, out_dir: str, *, dtype: str = "float32",
                  model_type: str | None = None, max_shard_bytes: int = 4 << 30,
                  bos_id: int | None = None, eos_id: int | None = None) -> list[str]:
  """Writes HF safetensors (sharded with model.safetensors.index.json past `max_shard_bytes`)
  and config.json into out_dir; returns the files written. Every process must call it (the
  gathers are collective); process 0 writes."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  config = hf_config(cfg, model_type, dtype, bos_id, eos_id)
  tensors = hf_tensors(params, cfg)
  shards, size = [[]], 0
  for item in tensors:
    nbytes = math.prod(item[1]) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for file, shard in zip(names, shards):
    arrays = {name: get().astype(np_dtype) for name, _, get in shard}
    weight_map.update({name: file for name in arrays})
    if writer:
      save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
  written = list(names)
  if writer:
    if len(shards) > 1:
      total = sum(math.prod(s) * np_dtype.itemsize for _, s, _ in tensors)
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
      written.append("model.safetensors.index.json")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    written.append("config.json")
  return [os.path.join(out_dir, n) for n in written]


# ------------------------------------------------------------------ workdirs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def template_config(template):
  """The run config whose settings (batch, optimizer, data, mesh) an imported model takes: a
  ConfigDict as is, a config file spec ('configs/lm.py:size=tiny'), or a bare size name of the
  project's configs/lm.py. Loaded by path, as --config is: the library imports no config."""
  if not isinstance(template, str):
    return template.copy_and_resolve_references()
  spec = template if ".py" in template else (
      f"{os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'lm.py')}"
      f":size={template}")
  return config_lib.load_config_file(spec)


def import_config(hf: dict, template="tiny", dtype: str = "bfloat16",
                  tokenizer: str | None = None):
  """Our run config for an HF model: the template's run settings (`template_config`) with the
  model fields of `hf`."""
  config = template_config(template)
  with config.unlocked():
    config.model.update(model_fields(hf))
    config.model.dtype = dtype
    config.seq_len = min(config.seq_len, config.model.max_seq_len)
    if tokenizer:
      config.data.tokenizer = tokenizer
  return config


def import_checkpoint(source: str, workdir: str, *, template: str = "tiny",
                      dtype: str = "bfloat16", params_only: bool = False,
                      overrides: Sequence[str] = ()) -> str:
  """An HF checkpoint -> `workdir` (config.json, checkpoints/0/). Returns the workdir.

  The state saved is the trainer's ({step: 0, params, opt_state: a fresh optimizer}), or
  {step, params} with params_only. A tokenizer.json beside the weights is copied into the workdir
  and becomes data.tokenizer.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from foundation import build as build_lib  # pylint: disable=g-import-not-at-top
  from foundation import checkpoint  # pylint: disable=g-import-not-at-top
  from foundation import generate  # pylint: disable=g-import-not-at-top
  files, config_path = checkpoint_files(source)
  hf = read_json(config_path)
  if "://" in workdir:
    raise ValueError(f"--workdir {workdir}: import writes a local workdir; copy it afterwards")
  workdir = os.path.abspath(workdir)
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} already holds checkpoints: import into a new --workdir")
  os.makedirs(workdir, exist_ok=True)
  tokenizer = None
  folder = os.path.dirname(config_path)
  if os.path.exists(os.path.join(folder, "tokenizer.json")):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(folder, name)):
        shutil.copy(os.path.join(folder, name), os.path.join(workdir, name))
    tokenizer = os.path.join(workdir, "tokenizer.json")
  config = ml_collections.ConfigDict(generate.apply_overrides(
      import_config(hf, template, dtype, tokenizer).to_dict(), overrides))
  built = build_lib.build(config)
  model, optimizer = built.model, built.optimizer
  abstract, shardings = built.abstract_state, built.state_shardings
  params = load_params(source, model.cfg, abstract["params"])
  state = {"step": jax.device_put(np.zeros((), np.int32), shardings["step"]), "params": params}
  if not params_only:  # the trainer's state: a fresh optimizer, laid out as training lays it
    state["opt_state"] = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
  manager = checkpoint.make_manager(workdir, config)
  manager.save(0, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({**checkpoint.run_metadata(0), "imported_from": os.path.abspath(
          source), "files": [os.path.basename(f) for f in files]})))
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_config(workdir, config)
  return workdir


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None,
                      dtype: str = "float32", model_type: str | None = None,
                      max_shard_bytes: int = 4 << 30) -> list[str]:
  """A workdir's checkpoint (params only) -> HF safetensors + config.json in out_dir.

  A LoRA run's adapters are merged into the kernels (generate.load does it: lora.model_params), so
  the export is a plain model of the base's shape. The tokenizer.json of the workdir (an imported model's, or a
  run's copy) goes along.
  """
  from foundation import generate  # pylint: disable=g-import-not-at-top
  session = generate.load(workdir, step)
  cfg, params = session.model.cfg, session.params
  if cfg.num_classes:
    raise UnsupportedModelError(
        f"{workdir} is a classifier (model.num_classes={cfg.num_classes}); export writes causal "
        f"language models (LlamaForCausalLM and kin), which have no classification head")
  tok = session.tokenizer
  files = export_params(params, cfg, out_dir, dtype=dtype,
                        model_type=model_type, max_shard_bytes=max_shard_bytes,
                        bos_id=tok.bos_id, eos_id=tok.eos_id)
  if jax.process_index() == 0 and isinstance(tok, tokenizers.ByteTokenizer):
    # No file to copy: describe the byte ids as a tokenizer.json that transformers reads.
    for name, contents in tokenizers.byte_tokenizer_files().items():
      with open(os.path.join(out_dir, name), "wb") as f:
        f.write(contents)
      files.append(name)
    return files
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(workdir, name)) and jax.process_index() == 0:
      shutil.copy(os.path.join(workdir, name), os.path.join(out_dir, name))
  return files


# ------------------------------------------------------------------ command line

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("source", None, "import: an HF checkpoint folder, .safetensors or index.")
  flags.DEFINE_string("workdir", None, "import: the workdir to create; export: the one to read.")
  flags.DEFINE_string("out", None, "export: the folder for safetensors + config.json.")
  flags.DEFINE_string("dtype", None, "import: compute dtype (default bfloat16); export: the "
                      "safetensors dtype (default float32).")
  flags.DEFINE_string("template", "tiny", "import: a configs/lm.py size, or a config file spec "
                      "(configs/lm.py:size=1b), whose run settings (batch, optimizer, data, mesh) "
                      "the new workdir's config.json takes.")
  flags.DEFINE_bool("params_only", False, "import: save no optimizer state.")
  flags.DEFINE_multi_string("override", [], "import: a config field, e.g. mesh.tensor=2.")
  flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
  flags.DEFINE_string("model_type", None, "export: llama, mistral or qwen2 (default: by features).")
  flags.DEFINE_integer("max_shard_mb", 4096, "export: the largest safetensors file.")


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from foundation import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise app.UsageError("usage: python -m foundation.hf import --source HF_DIR --workdir DIR | "
                         "export --workdir DIR --out HF_DIR")
  mesh_lib.initialize_distributed()
  try:
    if argv[1] == "import":
      if not (f.source and f.workdir):
        raise app.UsageError("import needs --source and --workdir")
      workdir = import_checkpoint(f.source, f.workdir, template=f.template,
                                  dtype=f.dtype or "bfloat16", params_only=f.params_only,
                                  overrides=f.override)
      print(f"imported {f.source} into {workdir}")
    else:
      if not (f.workdir and f.out):
        raise app.UsageError("export needs --workdir and --out")
      files = export_checkpoint(f.workdir, f.out, step=f.step, dtype=f.dtype or "float32",
                                model_type=f.model_type, max_shard_bytes=f.max_shard_mb << 20)
      print(f"exported {f.workdir} to {', '.join(files)}")
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
