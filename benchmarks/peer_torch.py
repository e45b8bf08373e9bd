r"""The PyTorch peer of `python -m foundation.bench`: Hugging Face LlamaForCausalLM, same shape.

  python benchmarks/peer_torch.py --config configs/lm.py:size=1b --config.batch_size=8 \
      [--steps 30 --warmup 5 --json peer.json --precision same|bf16 --nocompile]

The model is built from our config through foundation/hf.py's config.json mapping (d_model,
layers, heads, kv heads, mlp, vocab, rope theta, tied embeddings), with SDPA attention; trained with
AdamW (fused on CUDA; no weight decay on norms and embeddings, as ours), global-norm clipping and
our learning rate, on random tokens of the same batch and sequence. `--precision same` keeps our
numerics: params in model.param_dtype, matmuls autocast to model.dtype (float32 master weights,
bf16 compute for the real sizes); `bf16` puts params and optimizer state in bf16 too (faster, less
exact). torch.compile wraps the forward pass and the loss (`--nocompile`: eager, as on a CPU where
compiling is slow). Each step is timed to CUDA completion after the warm-up; the result record has
the fields of foundation.bench's, so the two compare key by key.

Needs torch and transformers (not dependencies of foundation): `pip install torch transformers`.
JAX is imported for the shared config mapping and formulas only; it never starts on the GPU here.
"""

import json
import math
import os
import shlex
import sys
import time

# JAX (imported through foundation) must not take the GPU from PyTorch in this process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from foundation import bench  # noqa: E402
from foundation import config as config_lib  # noqa: E402
from foundation import hf  # noqa: E402
from foundation import metrics as metrics_lib  # noqa: E402
from foundation.models import transformer  # noqa: E402


def build_model(config, device, param_dtype):
  """LlamaForCausalLM of our config's shape, SDPA attention, params in `param_dtype`."""
  import torch
  import transformers
  cfg = transformer.ModelConfig.from_config(config.model)
  hf_dict = hf.hf_config(cfg, "llama")  # refuses what a plain Llama cannot hold (biases, windows)
  hf_dict.pop("torch_dtype")  # transformers 5 names it `dtype`, given below
  hf_dict["use_cache"] = False
  torch.manual_seed(config.seed)
  with torch.device(device):
    model = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**hf_dict), attn_implementation="sdpa", dtype=param_dtype)
  return model.to(device=device, dtype=param_dtype).train()


def make_optimizer(model, config, device):
  """AdamW as ours: decay on matrices only, not on norms or the embedding table."""
  import torch
  o = config.optim
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
  groups = [{"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
  fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
  return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, **fused)


def make_train_step(model, optimizer, config, autocast_dtype, compile_model: bool):
  import torch
  import torch.nn.functional as F
  vocab, clip = config.model.vocab_size, config.optim.clip_norm
  device_type = next(model.parameters()).device.type

  def loss_fn(inputs, targets):
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      logits = model(input_ids=inputs, use_cache=False).logits
    # float32 softmax, as ours; mean over every token (the synthetic batch has no padding).
    return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))

  loss_fn = torch.compile(loss_fn) if compile_model else loss_fn

  def train_step(inputs, targets):
    loss = loss_fn(inputs, targets)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  return train_step


def random_batches(config, device, n: int = bench.N_BATCHES):
  """n (inputs, targets) pairs of uniform tokens in [3, vocab), as foundation's synthetic data."""
  import torch
  g = torch.Generator(device="cpu").manual_seed(config.seed)
  out = []
  for _ in range(n):
    tokens = torch.randint(3, config.model.vocab_size, (config.batch_size, config.seq_len + 1),
                           generator=g)
    out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
  return out


def time_steps(train_step, batches, steps: int, warmup: int, sync):
  """(per-step seconds synced to the device, seconds per step pipelined, losses)."""
  synced, losses = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = train_step(*batches[i % len(batches)])
    sync()
    if i >= warmup:
      synced.append(time.perf_counter() - t0)
      losses.append(loss)
  t0 = time.perf_counter()
  for i in range(steps):
    loss = train_step(*batches[i % len(batches)])
  sync()
  return synced, (time.perf_counter() - t0) / steps, [float(x) for x in losses]


def environment(device) -> dict:
  import platform
  import torch
  import transformers
  cuda = device.type == "cuda"
  return {
      "platform": "gpu" if cuda else "cpu",
      "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
      "devices": 1, "torch": torch.__version__, "transformers": transformers.__version__,
      "cuda": {"cuda_runtime": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version()} if cuda else {},
      "python": platform.python_version(), "host": platform.node(),
  }


def peer(config, steps: int, warmup: int, precision: str, compile_model: bool) -> dict:
  """Builds and times the peer; the result record (fields as foundation.bench's)."""
  import torch
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
  if precision == "bf16":
    param_dtype, autocast_dtype = torch.bfloat16, None
  else:
    param_dtype = dtypes[config.model.param_dtype]
    compute = dtypes[config.model.dtype]
    autocast_dtype = None if compute == param_dtype else compute
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls as XLA's default precision
  env = environment(device)
  tokens = config.batch_size * config.seq_len
  result = {"framework": "torch", "model_class": "LlamaForCausalLM", "attention": "sdpa",
            "size": config.size, "shape": bench.model_shape(config),
            "batch_size": config.batch_size, "seq_len": config.seq_len, "tokens_per_step": tokens,
            "precision": precision, "param_dtype": str(param_dtype).removeprefix("torch."),
            "dtype": str(autocast_dtype or param_dtype).removeprefix("torch."),
            "compiled": compile_model, "steps": steps, "warmup": warmup, **env}
  try:
    model = build_model(config, device, param_dtype)
    result["params"] = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, config, device)
    train_step = make_train_step(model, optimizer, config, autocast_dtype, compile_model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synced, pipelined, losses = time_steps(
        train_step, random_batches(config, device), steps, warmup, sync)
  except torch.OutOfMemoryError as e:
    return {**result, "fits": False, "error": str(e).splitlines()[0][:500]}
  stats = bench.timing_stats(synced)
  stats["pipelined_mean"] = pipelined
  peak = metrics_lib.peak_flops_per_device(env["device_kind"], config.log.peak_tflops)
  flops = bench.model_flops_per_step(config)
  result.update(
      fits=True, step_time=stats, flops_per_step=flops, peak_flops_per_device=peak,
      **bench.rates(stats["median"], tokens, flops, 1, peak, None),
      loss={"first": losses[0], "last": losses[-1],
            "finite": all(math.isfinite(x) for x in losses)},
      peak_bytes_in_use=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
  return result


def format_report(r: dict) -> str:
  lines = [f"command: {r['command']}",
           f"device: {r['device_kind']}; torch {r['torch']}, transformers {r['transformers']}",
           f"model: {r['model_class']} ({r['size']} shape), {r['params'] / 1e6:,.1f}M params, "
           f"batch {r['batch_size']} x {r['seq_len']}, {r['dtype']} compute / {r['param_dtype']} "
           f"params, attention {r['attention']}, torch.compile {r['compiled']}"]
  if not r["fits"]:
    return "\n".join(lines + [f"does not fit: {r['error']}"])
  s = r["step_time"]
  mfu = r["mfu"]
  lines += [f"step time: median {s['median'] * 1e3:.2f} ms (p10 {s['p10'] * 1e3:.2f}, p90 "
            f"{s['p90'] * 1e3:.2f}) over {s['n']} steps after {r['warmup']} warm-up",
            f"tokens/s: {r['tokens_per_sec']:,.0f}; TFLOP/s per device "
            f"{r['tflops_per_device']['palm']:.4g}; MFU "
            + (f"{mfu['palm']:.1%} (causal {mfu['causal']:.1%})" if mfu else "n/a"),
            f"loss: {r['loss']['first']:.4f} -> {r['loss']['last']:.4f}"]
  return "\n".join(lines)


def define_flags():
  """The command's flags; defined only when run as a command, so that tests can import this file."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 30, "Timed steps (after the warm-up).")
  flags.DEFINE_integer("warmup", 5, "Untimed steps first: compilation, autotuning, allocation.")
  flags.DEFINE_string("json", "", "Also write the result record to this JSON file.")
  flags.DEFINE_bool("compile", True, "torch.compile the forward pass and loss.")
  flags.DEFINE_enum("precision", "same", ["same", "bf16"],
                    "same: our param/compute dtypes (autocast); bf16: bf16 params and Adam state.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/lm.py:size=test")
  logging.set_verbosity(logging.ERROR)
  try:
    config_lib.check_values(f.config)
    result = peer(f.config, f.steps, f.warmup, f.precision, f.compile)
  except (config_lib.ConfigError, hf.UnsupportedModelError) as e:
    raise SystemExit(f"config error: {e}") from None
  result["command"] = "python benchmarks/peer_torch.py " + shlex.join(sys.argv[1:])
  print(format_report(result), flush=True)
  if f.json:
    with open(f.json, "w") as out:
      json.dump(result, out, indent=2)
  if not result["fits"]:
    sys.exit(3)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
