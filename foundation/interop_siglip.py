r"""Hugging Face SigLIP (`SiglipModel`) -> the two-tower family.

  python -m foundation.interop_siglip --source google/siglip-base-patch16-224/ --workdir runs/siglip-b

The source is a transformers checkpoint folder (config.json + model.safetensors, or shards with
model.safetensors.index.json). The workdir gets config.json (configs/siglip.py's run settings, or
--template's, with the model's shapes) and checkpoints/0/ (params and a fresh optimizer), so
`python -m foundation.train` fine-tunes it and the zero-shot / retrieval evaluators read it.

The mapping (SigLIP's towers are the family's 'siglip' text arch and a ViT with pool='map'):
  vision_model.embeddings.patch_embedding  [D, C, p, p] -> image/embedding [p, p, C, D] (+ bias)
  vision_model.embeddings.position_embedding           -> image/pos_embedding [patches, D]
  *.encoder.layers.i.{layer_norm1, layer_norm2}        -> layers/{attn_norm, mlp_norm}[i]
  *.self_attn.{q,k,v}_proj [H*h, D] (+ bias)           -> layers/attn/{q,k,v} [D, H, h] (+ [H, h])
  *.self_attn.out_proj [D, H*h]                        -> layers/attn/o [H, h, D] (+ bias)
  *.mlp.fc1, fc2                                       -> layers/mlp/wi, wo (transposed)
  vision_model.post_layernorm                          -> image/final_norm
  vision_model.head.{probe, attention.in_proj_*, attention.out_proj, layernorm, mlp}
                                                       -> image/map_head/{probe, attn/{q,k,v}, o,
                                                          norm, mlp}
  text_model.embeddings.{token,position}_embedding     -> text/{embedding, pos_embedding}
  text_model.final_layer_norm, text_model.head         -> text/final_norm, text_head
  logit_scale, logit_bias                              -> t, b
SigLIP has no image head (its pooled image features are the embedding): image_proj=False, and
the vision width must equal the text head's output (projection_size).
"""

import os
from typing import Sequence

import jax
import numpy as np

from foundation import hf as hf_lib

DEFAULT_TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs", "siglip.py") + ":size=test"


def model_fields(hf: dict) -> dict:
  """config.model of the two-tower family for an HF SiglipConfig dict; one-line errors."""
  if hf.get("model_type") != "siglip":
    raise hf_lib.UnsupportedModelError(
        f"model_type={hf.get('model_type')!r}: this importer reads SiglipModel checkpoints "
        f"(model_type 'siglip')")
  text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
  for where, part in (("text_config", text), ("vision_config", vision)):
    act = part.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
      raise hf_lib.UnsupportedModelError(f"{where}.hidden_act={act!r}: the towers use the tanh "
                                         f"GELU (gelu_pytorch_tanh)")
  if not vision.get("vision_use_head", True):
    raise hf_lib.UnsupportedModelError("vision_config.vision_use_head=False: the image tower "
                                       "pools with SigLIP's attention head")
  projection = int(text.get("projection_size") or text.get("hidden_size", 768))
  width = int(vision.get("hidden_size", 768))
  if width != projection:
    raise hf_lib.UnsupportedModelError(
        f"vision_config.hidden_size={width} does not match text_config.projection_size="
        f"{projection}: SigLIP's image features are its embedding")
  image = dict(width=width, depth=int(vision.get("num_hidden_layers", 12)),
               num_heads=int(vision.get("num_attention_heads", 12)),
               mlp_dim=int(vision.get("intermediate_size", 3072)),
               patch_size=int(vision.get("patch_size", 16)), num_classes=0, pool="map",
               posemb="learn", dropout=0.0, norm_eps=float(vision.get("layer_norm_eps", 1e-6)))
  text_fields = dict(arch="siglip", vocab_size=int(text.get("vocab_size", 32000)),
                     width=int(text.get("hidden_size", 768)),
                     depth=int(text.get("num_hidden_layers", 12)),
                     num_heads=int(text.get("num_attention_heads", 12)),
                     mlp_dim=int(text.get("intermediate_size", 3072)),
                     max_len=int(text.get("max_position_embeddings", 64)), pool="last",
                     norm_eps=float(text.get("layer_norm_eps", 1e-6)))
  return dict(family="two_tower", embed_dim=projection, image_proj=False, text_proj=True,
              max_scale=0.0, image=image, text=text_fields,
              image_size=int(vision.get("image_size", 224)),
              channels=int(vision.get("num_channels", 3)))


def import_config(hf: dict, template: str = DEFAULT_TEMPLATE, dtype: str = "float32"):
  """Our run config: the template's run settings with the model's shapes."""
  config = hf_lib.template_config(template)
  fields = model_fields(hf)
  with config.unlocked():
    config.data.image_size, config.data.channels = fields.pop("image_size"), fields.pop("channels")
    for tower in ("image", "text"):
      config.model[tower].update(fields.pop(tower))
      config.model[tower].dtype = dtype
    config.model.update(fields)
    config.data.text_len = config.model.text.max_len   # SigLIP pads every text to its length
  return config


def _linear(w: np.ndarray, heads: int | None = None, into_heads: bool = True) -> np.ndarray:
  """torch Linear weight [out, in] -> our kernel [in, out], split into heads where asked."""
  kernel = w.T
  if heads is None:
    return kernel
  if into_heads:  # q/k/v: [D, H*h] -> [D, H, h]
    return kernel.reshape(kernel.shape[0], heads, -1)
  return kernel.reshape(heads, -1, kernel.shape[1])  # o: [H*h, D] -> [H, h, D]


def _attention(get, prefix: str, heads: int, fused: bool = False) -> dict:
  if fused:  # torch.nn.MultiheadAttention: in_proj [3D, D] = q; k; v
    w, b = get(f"{prefix}.in_proj_weight"), get(f"{prefix}.in_proj_bias")
    parts = dict(zip("qkv", np.split(w, 3)))
    biases = dict(zip("qkv", np.split(b, 3)))
  else:
    parts = {n: get(f"{prefix}.{n}_proj.weight") for n in "qkv"}
    biases = {n: get(f"{prefix}.{n}_proj.bias") for n in "qkv"}
  out = {n: {"kernel": _linear(parts[n], heads), "bias": biases[n].reshape(heads, -1)}
         for n in "qkv"}
  out["o"] = {"kernel": _linear(get(f"{prefix}.out_proj.weight"), heads, into_heads=False),
              "bias": get(f"{prefix}.out_proj.bias")}
  return out


def _norm(get, name: str) -> dict:
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _mlp(get, prefix: str) -> dict:
  return {"wi": {"kernel": _linear(get(f"{prefix}.fc1.weight")), "bias": get(f"{prefix}.fc1.bias")},
          "wo": {"kernel": _linear(get(f"{prefix}.fc2.weight")), "bias": get(f"{prefix}.fc2.bias")}}


def _encoder_layers(get, prefix: str, depth: int, heads: int, scan: bool) -> dict:
  per_layer = [{"attn_norm": _norm(get, f"{prefix}.{i}.layer_norm1"),
                "attn": _attention(get, f"{prefix}.{i}.self_attn", heads),
                "mlp_norm": _norm(get, f"{prefix}.{i}.layer_norm2"),
                "mlp": _mlp(get, f"{prefix}.{i}.mlp")} for i in range(depth)]
  if scan:
    return {"layers": jax.tree.map(lambda *a: np.stack(a), *per_layer)}
  return {f"layers_{i}": layer for i, layer in enumerate(per_layer)}


def params_from_hf(weights: dict, cfg) -> dict:
  """Our param tree (numpy) from the HF state dict `weights` (name -> numpy array)."""
  def get(name):
    if name not in weights:
      raise hf_lib.WeightShapeError(f"the checkpoint has no tensor {name!r} (SiglipModel "
                                    f"weights expected)")
    return np.asarray(weights[name], np.float32)
  image, text = cfg.image, cfg.text
  patch = get("vision_model.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
  vision = {"embedding": {"kernel": patch, "bias": get("vision_model.embeddings.patch_embedding.bias")},
            "pos_embedding": get("vision_model.embeddings.position_embedding.weight"),
            **_encoder_layers(get, "vision_model.encoder.layers", image.depth, image.num_heads,
                              image.scan_layers),
            "final_norm": _norm(get, "vision_model.post_layernorm"),
            "map_head": {"probe": get("vision_model.head.probe"),
                         "attn": _attention(get, "vision_model.head.attention", image.num_heads,
                                            fused=True),
                         "norm": _norm(get, "vision_model.head.layernorm"),
                         "mlp": _mlp(get, "vision_model.head.mlp")}}
  texts = {"embedding": get("text_model.embeddings.token_embedding.weight"),
           "pos_embedding": get("text_model.embeddings.position_embedding.weight"),
           **_encoder_layers(get, "text_model.encoder.layers", text.depth, text.num_heads,
                             text.scan_layers),
           "final_norm": _norm(get, "text_model.final_layer_norm")}
  return {"image": vision, "text": texts,
          "text_head": {"kernel": _linear(get("text_model.head.weight")),
                        "bias": get("text_model.head.bias")},
          "t": get("logit_scale").reshape(()), "b": get("logit_bias").reshape(())}


def read_weights(source: str) -> tuple[dict, dict, list[str]]:
  """(HF config dict, {name: numpy array}, files) of a checkpoint folder, file or index."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  files, config_path = hf_lib.checkpoint_files(source)
  weights = {}
  for path in files:
    weights.update(load_file(path))
  return hf_lib.read_json(config_path), weights, files


def load(source: str, template: str = DEFAULT_TEMPLATE, dtype: str = "float32"):
  """(config, params as numpy, files): a SigLIP checkpoint as our config and param tree, checked
  against the shapes the family would create."""
  from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
  hf, weights, files = read_weights(source)
  config = import_config(hf, template, dtype)
  model = step_lib.make_model(config)
  params = params_from_hf(weights, model.cfg)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  task = step_lib.make_task(config)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), *task.model_args(task.dummy_batch(1)))["params"]))
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise hf_lib.WeightShapeError(f"param {name}: the checkpoint gives shape {got.get(name)}, "
                                    f"the config.json's sizes need {want.get(name)}")
  return config, params, files


def import_checkpoint(source: str, workdir: str, *, template: str = DEFAULT_TEMPLATE,
                      dtype: str = "float32", overrides: Sequence[str] = ()) -> str:
  """A SigLIP checkpoint -> `workdir` (config.json, checkpoints/0/ with a fresh optimizer)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from foundation import build as build_lib  # pylint: disable=g-import-not-at-top
  from foundation import checkpoint  # pylint: disable=g-import-not-at-top
  from foundation import generate  # pylint: disable=g-import-not-at-top
  from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} already holds checkpoints: import into a new --workdir")
  config, params, files = load(source, template, dtype)
  config = ml_collections.ConfigDict(generate.apply_overrides(config.to_dict(), overrides))
  built = build_lib.build(config)
  shardings = built.state_shardings
  params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings["params"])
  state = {"step": jax.device_put(np.zeros((), np.int32), shardings["step"]), "params": params,
           "opt_state": jax.jit(built.optimizer.init, out_shardings=shardings["opt_state"])(params),
           "guard": jax.device_put(step_lib.initial_guard(), shardings["guard"])}
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.make_manager(workdir, config)
  manager.save(0, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({**checkpoint.run_metadata(0), "imported_from": os.path.abspath(
          source), "files": [os.path.basename(f) for f in files]})))
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_config(workdir, config)
  return workdir


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if not f.source or not f.workdir:
    raise app.UsageError("--source and --workdir are required")
  try:
    print(import_checkpoint(f.source, f.workdir, template=f.template, dtype=f.dtype,
                            overrides=f.override))
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  from absl import app as _app, flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string("source", None, "A SiglipModel checkpoint folder (or .safetensors / index).")
  _flags.DEFINE_string("workdir", None, "The workdir to write.")
  _flags.DEFINE_string("template", DEFAULT_TEMPLATE, "The run config whose settings it takes.")
  _flags.DEFINE_string("dtype", "float32", "Compute dtype.")
  _flags.DEFINE_multi_string("override", [], "A config field, e.g. mesh.fsdp=2.")
  _app.run(main)
