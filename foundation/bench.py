r"""Train-step speed: step time, tokens/s, TFLOP/s per device and MFU, on synthetic batches.

  python -m foundation.bench --config configs/lm.py:size=1b --config.batch_size=8 \
      [--config.model.attention=cudnn ...] [--steps 30 --warmup 5 --json bench.json --peer]

The model, optimizer, mesh and jitted train step are built exactly as the trainer builds them
(foundation/step.py); the batches are random tokens already on the devices, so no input pipeline
(and no TensorFlow) is involved. Each step is timed to device completion after `--warmup` steps
(compilation and autotuning stay out); the report gives the median and p10/p90 over `--steps`.
Model FLOPs are the PaLM formula's (foundation/models/transformer.py), in the MFU convention (the
full attention square) and the causal one (half of it), against the data-sheet peak and against
this device's own matmul ceiling, measured in the same run beside its copy bandwidth.

On a GPU (a CUDA plugin installed) it first applies launch/gpu_env.sh, the XLA flags the launchers
use, and records them. `--peer` first runs benchmarks/peer_torch.py -- Hugging Face
LlamaForCausalLM of the same shape, batch and sequence on the same device -- and reports the
tokens/s ratio. On a CPU the small sizes (size=test, tiny) run in seconds; the tests run it so.
"""

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from foundation import build as build_lib
from foundation import config as config_lib
from foundation import mesh as mesh_lib
from foundation import metrics as metrics_lib
from foundation import step as step_lib
from foundation.data import synthetic
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_ENV = os.path.join(ROOT, "launch", "gpu_env.sh")
PEER = os.path.join(ROOT, "benchmarks", "peer_torch.py")
GiB = 1024 ** 3
# Distinct batches cycled through the timed steps: real data never repeats a step's input.
N_BATCHES = 4
# Ceiling sizes: large enough to fill an accelerator (an 8192^3 product, 1 GiB copied), small
# enough to take well under a second on a CPU.
CEILING_SIZES = {"gpu": (8192, GiB), "tpu": (8192, GiB), "cpu": (1024, 64 * 2 ** 20)}


# ------------------------------------------------------------------ environment

def cuda_plugin_installed() -> bool:
  """Whether JAX could start on an NVIDIA GPU here (checked without starting any backend)."""
  import importlib.util
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def apply_gpu_env(path: str = GPU_ENV) -> dict[str, str]:
  """Sources `path` in bash and copies what it set or changed into os.environ.

  The launchers source the same file, so the flags live in one place. Must run before JAX starts
  its backends: XLA reads XLA_FLAGS once, when the first one starts.
  """
  script = f'. {shlex.quote(path)} >/dev/null && env -0'
  out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env=os.environ)
  after = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
  changed = {k: v for k, v in after.items()
             if os.environ.get(k) != v and k.startswith(("XLA_", "JAX_", "NCCL_", "CUDA_"))}
  os.environ.update(changed)
  return changed


def cuda_versions() -> dict:
  """CUDA runtime, driver, cuDNN and cuBLAS versions of the JAX CUDA plugin ({} without one)."""
  from jax._src import lib
  versions = {}
  for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas"):
    get = getattr(lib.cuda_versions, f"{name}_get_version", None) if lib.cuda_versions else None
    try:
      versions[name] = get() if get else None
    except Exception:  # a function the plugin has but cannot answer without a GPU
      versions[name] = None
  return {k: v for k, v in versions.items() if v is not None}


def environment(devices) -> dict:
  """What the numbers depend on: devices, versions, flags."""
  from jax._src import lib
  return {
      "platform": devices[0].platform, "device_kind": devices[0].device_kind,
      "devices": len(devices), "processes": jax.process_count(),
      "jax": jax.__version__, "jaxlib": lib.version_str, "cuda": cuda_versions(),
      "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "env": {k: v for k, v in sorted(os.environ.items())
              if k.startswith(("XLA_CLIENT", "XLA_PYTHON", "JAX_", "NCCL_", "CUDA_DEVICE"))},
  }


# ------------------------------------------------------------------ timing

def timing_stats(seconds) -> dict:
  """Median, p10, p90, mean, min, max of per-step seconds (and the raw list)."""
  s = np.asarray(seconds, np.float64)
  return {"median": float(np.median(s)), "p10": float(np.percentile(s, 10)),
          "p90": float(np.percentile(s, 90)), "mean": float(s.mean()), "min": float(s.min()),
          "max": float(s.max()), "n": int(s.size), "all": [float(x) for x in s]}


def time_calls(fn, args, calls: int, reps: int) -> list[float]:
  """Seconds per call: `calls` back-to-back calls, one sync, `reps` times.

  Dispatch runs ahead of the device, so the device never waits for Python between calls; the
  calls run in order on the device, so the last one done means all are.
  """
  jax.block_until_ready(fn(*args))  # compile and warm up
  per_call = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / calls)
  return per_call


def matmul_ceiling(device, dtype: str, n: int, calls: int = 10, reps: int = 5) -> dict:
  """TFLOP/s of an n x n x n product in `dtype` on one device, on random (never zero) inputs."""
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
  b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
  seconds = time_calls(jax.jit(jnp.matmul), (a, b), calls, reps)
  del a, b
  return {"tflops": 2 * n ** 3 / float(np.median(seconds)) / 1e12, "n": n, "dtype": dtype,
          "seconds": float(np.median(seconds))}


def copy_ceiling(device, nbytes: int, calls: int = 10, reps: int = 5) -> dict:
  """GB/s of reading and writing a float32 buffer once (x * 2: XLA may skip a plain copy)."""
  x = jax.device_put(jax.random.normal(jax.random.key(2), (nbytes // 4,), jnp.float32), device)
  seconds = time_calls(jax.jit(lambda v: v * 2), (x,), calls, reps)
  del x
  return {"gbps": 2 * nbytes / float(np.median(seconds)) / 1e9, "bytes": nbytes,
          "seconds": float(np.median(seconds))}


def ceilings(device, dtype: str) -> dict:
  n, nbytes = CEILING_SIZES.get(device.platform, CEILING_SIZES["cpu"])
  return {"matmul": matmul_ceiling(device, dtype, n), "copy": copy_ceiling(device, nbytes)}


# ------------------------------------------------------------------ the model's numbers

def model_shape(config) -> dict:
  m = config.model
  return {k: m[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                            "head_dim", "mlp_dim", "rope_theta", "tie_embeddings")}


def model_flops_per_step(config) -> dict[str, float]:
  """PaLM-formula training FLOPs per step: 'palm' (full attention square), 'causal' (half)."""
  mcfg = transformer.ModelConfig.from_config(config.model)
  tokens = config.batch_size * config.seq_len
  return {"palm": transformer.flops_per_token(mcfg, config.seq_len) * tokens,
          "causal": transformer.flops_per_token(mcfg, config.seq_len, causal=True) * tokens}


def rates(step_time: float, tokens_per_step: int, flops: dict, devices: int,
          peak_flops: float | None, matmul_tflops: float | None) -> dict:
  """tokens/s, TFLOP/s per device, MFU vs the data-sheet peak and vs the measured matmul."""
  tflops = {k: v / step_time / devices / 1e12 for k, v in flops.items()}
  return {
      "tokens_per_sec": tokens_per_step / step_time,
      "tflops_per_device": tflops,
      "mfu": {k: v * 1e12 / peak_flops for k, v in tflops.items()} if peak_flops else None,
      "mfu_of_matmul_ceiling": ({k: v / matmul_tflops for k, v in tflops.items()}
                                if matmul_tflops else None),
  }


# ------------------------------------------------------------------ the train step

def check_devices(config, devices) -> None:
  if config.model.attention == "cudnn" and devices[0].platform != "gpu":
    raise config_lib.ConfigError(
        f"model.attention='cudnn' needs an NVIDIA GPU; this run's devices are "
        f"{devices[0].platform} ({devices[0].device_kind}): use model.attention=xla")
  config_lib.validate(config, devices, jax.process_count())


def device_batches(config, mesh, n: int = N_BATCHES) -> list[dict]:
  """`n` global synthetic batches, already laid out like the trainer's batches."""
  shardings = step_lib.batch_shardings(config, mesh)
  host_batch = config.batch_size // jax.process_count()
  return [mesh_lib.make_global_batch(synthetic.synthetic_batch(
      config.seed, 0, jax.process_index(), i, host_batch, config.seq_len,
      config.model.vocab_size), shardings) for i in range(n)]


def build_step(config, mesh) -> dict:
  """Model, optimizer, abstract state and shardings, the jitted step and its abstract batch."""
  built = build_lib.build(config, mesh=mesh)
  train_step, _ = built.jit_steps()
  return {"model": built.model, "optimizer": built.optimizer,
          "abstract_state": built.abstract_state, "shardings": built.state_shardings,
          "train_step": train_step, "abstract_batch": built.abstract_batch(), "built": built}


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def compile_step(config, mesh, built: dict):
  """(compiled step, the compiler's per-device memory estimate in bytes or None, seconds)."""
  t0 = time.perf_counter()
  with step_lib.sharding_context(config, mesh):
    compiled = built["train_step"].lower(built["abstract_state"], built["abstract_batch"]).compile()
  seconds = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  if memory is None:
    return compiled, None, seconds
  # Donation aliases the new state onto the old: count that memory once.
  return compiled, int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes), seconds


def too_big(what: str, need: int, limit: int | None) -> str | None:
  """Why `need` bytes per device cannot fit under the device's `limit` (None when they can)."""
  if not limit or need <= limit:
    return None
  return (f"{what} needs {need / GiB:.2f} GiB per device, more than the {limit / GiB:.2f} GiB "
          f"this process may use (--memory_limit_gib, or the device's share: "
          f"XLA_CLIENT_MEM_FRACTION, 0.90 from launch/gpu_env.sh)")


def time_steps(train_step, state, batches, steps: int, warmup: int):
  """(state, per-step seconds synced to the device, seconds per step pipelined, losses)."""
  synced, losses = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      synced.append(time.perf_counter() - t0)
      losses.append(metrics["loss"])
  # The trainer syncs only to log: the same steps with one sync show what per-step syncs cost.
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - t0) / steps
  return state, synced, pipelined, [float(x) for x in jax.device_get(losses)]


def is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def bench(config, steps: int, warmup: int, measure_ceilings: bool = True,
          profile_steps: int = 0, memory_limit: int | None = None, rounds: int = 1,
          before_round=None) -> dict:
  """Builds, compiles and times the train step; returns the result record (see format_report).

  memory_limit: bytes per device to fit in (default: what the device reports, if it does).
  rounds: time the `steps` this many times (the warm-up only before the first); before_round(i),
  if given, runs before each (the peer, alternated with us so that a machine's changing load
  falls on both). The record's step_time pools every round's steps; `rounds` has each round's.
  """
  devices = jax.devices()
  check_devices(config, devices)
  env = environment(devices)
  result = {"framework": "jax", "size": config.size, "shape": model_shape(config),
            "batch_size": config.batch_size, "seq_len": config.seq_len,
            "tokens_per_step": config.batch_size * config.seq_len,
            "dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
            "attention": config.model.attention, "scan_layers": config.model.scan_layers,
            "remat_policy": config.model.remat_policy, "logits_chunk": config.model.logits_chunk,
            "grad_accum": config.grad_accum, "steps": steps, "warmup": warmup, **env}
  result["ceilings"] = ceilings(devices[0], config.model.dtype) if measure_ceilings else None

  mesh = mesh_lib.make_mesh(config.mesh, devices)
  result["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
  limit = memory_limit or (devices[0].memory_stats() or {}).get("bytes_limit")
  result["memory_limit_bytes"] = limit
  built = build_step(config, mesh)
  result["params"] = transformer.count_params(built["abstract_state"]["params"])
  result["state_bytes_per_device"] = bytes_per_device(built["abstract_state"])
  # Too big for the device is an answer (what is the largest model that fits?), found as early
  # and as cheaply as possible: the state before compiling, the compiler's estimate before running.
  refusal = too_big("the train state (params and Adam moments)",
                    result["state_bytes_per_device"], limit)
  if refusal:
    return {**result, "fits": False, "error": refusal}
  try:
    compiled, estimate, result["compile_seconds"] = compile_step(config, mesh, built)
    result["memory_estimate_bytes"] = estimate
    refusal = too_big("the compiled step (the compiler's estimate)", estimate or 0, limit)
    if refusal:
      return {**result, "fits": False, "error": refusal}
    state = built["built"].init_state()
    batches = device_batches(config, mesh)
    synced, pipelined, losses, per_round = [], [], [], []
    for i in range(rounds):
      if before_round is not None:
        before_round(i)
      load = os.getloadavg()
      with step_lib.sharding_context(config, mesh):
        state, round_synced, round_pipelined, round_losses = time_steps(
            compiled, state, batches, steps, warmup if i == 0 else 0)
      synced += round_synced
      pipelined.append(round_pipelined)
      losses += round_losses
      per_round.append({"step_median": float(np.median(round_synced)),
                        "tokens_per_sec": result["tokens_per_step"] / float(np.median(round_synced)),
                        "loadavg_before": list(load), "loadavg_after": list(os.getloadavg())})
  except jax.errors.JaxRuntimeError as e:
    if not is_out_of_memory(e):
      raise
    return {**result, "fits": False, "error": str(e).strip().splitlines()[0][:500]}
  stats = timing_stats(synced)
  stats["pipelined_mean"] = float(np.mean(pipelined))
  result["rounds"] = per_round
  if profile_steps:
    def one_step():
      nonlocal state
      state = compiled(state, batches[0])[0]
      jax.block_until_ready(state)
    try:
      result["breakdown"] = profile_breakdown(compiled, one_step, profile_steps, stats["median"])
    except Exception as e:  # the profiler is a diagnosis: its failure must not lose the timings
      result["breakdown"] = {"error": f"profiling failed: {type(e).__name__}: {e}"[:1000]}
  peak = metrics_lib.peak_flops_per_device(devices[0].device_kind, config.log.peak_tflops)
  flops = model_flops_per_step(config)
  matmul = result["ceilings"]["matmul"]["tflops"] if result["ceilings"] else None
  memory = devices[0].memory_stats() or {}
  result.update(
      fits=True, step_time=stats, flops_per_step=flops, peak_flops_per_device=peak,
      **rates(stats["median"], result["tokens_per_step"], flops, len(devices), peak, matmul),
      loss={"first": losses[0], "last": losses[-1], "finite": bool(np.isfinite(losses).all())},
      peak_bytes_in_use=memory.get("peak_bytes_in_use"), bytes_limit=memory.get("bytes_limit"))
  return result


# ------------------------------------------------------------------ where the time goes

# An op's part of the model, from the name stack JAX writes into its HLO metadata (op_name, e.g.
# "jit(train_step)/transpose(jvp(Transformer))/.../layers/mlp/wo/dot_general"); first match wins.
BREAKDOWN = (
    ("attention projections", re.compile(r"/attn/[qkvo]/")),
    ("attention (scores, softmax, values, rotary, mask)", re.compile(r"/attn/")),
    ("MLP", re.compile(r"/mlp/")),
    ("norms", re.compile(r"norm/")),
    ("embedding and output logits", re.compile(r"/(embed|output)/")),
    ("other model ops (residuals, casts)", re.compile(r"Transformer|/layers/")),
    ("loss (cross-entropy)", re.compile(r"jvp\(")),
    ("optimizer and update (clip, AdamW)", re.compile(r"")),
)
# How many of the costliest HLO ops the breakdown lists by name.
TOP_OPS = 15
# Ops whose trace events contain their body's events: counting them would count twice.
_CONTAINERS = re.compile(r"^(while|call|conditional)(\.\d+)?$")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name of its metadata, from a compiled module's text."""
  return dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text,
                         re.M))


def categorize(op_name: str | None) -> str:
  if not op_name:
    return "unattributed (copies, layout changes)"
  return next(name for name, pattern in BREAKDOWN if pattern.search("/" + op_name))


def _merged_length(intervals) -> float:
  """Total length of the union of (start, end) intervals: overlapping streams count once."""
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def profile_breakdown(compiled, step_fn, steps: int, step_time: float) -> dict:
  """Device time per step by part of the model, from a jax.profiler trace of `steps` steps.

  step_fn() runs one step and waits for it. Kernel times are summed per category; `idle` is the
  median step time less the time any kernel of the step ran (overlapping kernels counted once).
  """
  from jax.profiler import ProfileData
  names = op_names(compiled.as_text())
  module = re.match(r"HloModule (\S+?),", compiled.as_text()).group(1)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        step_fn()
    path = next(os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files
                if f.endswith(".xplane.pb"))
    planes = ProfileData.from_file(path).planes
  events = [(plane.name, e) for plane in planes for line in plane.lines for e in line.events
            if "hlo_op" in dict(e.stats)]
  # The step's own ops; all ops when the trace names no modules (the steps are all that ran).
  events = [(p, e) for p, e in events if dict(e.stats).get("hlo_module") == module] or events
  # An accelerator's own planes when it has them; on a CPU the ops run on host threads.
  on_device = [(p, e) for p, e in events if p.startswith("/device:")]
  events = [e for _, e in (on_device or events)
            if not _CONTAINERS.match(str(dict(e.stats).get("hlo_op", "")))]
  if not events:
    return {"error": f"no events of {module} in the trace; planes: {[p.name for p in planes]}"}
  per_category, per_op = {}, {}
  for e in events:
    op = str(dict(e.stats).get("hlo_op"))
    category = categorize(names.get(op))
    per_category[category] = per_category.get(category, 0.0) + e.duration_ns / 1e6 / steps
    per_op[op] = per_op.get(op, 0.0) + e.duration_ns / 1e6 / steps
  busy = _merged_length((e.start_ns, e.start_ns + e.duration_ns) for e in events) / 1e6 / steps
  # The costliest single ops, with the model part their metadata names: what to fix first.
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:TOP_OPS]
  return {"ms_per_step": dict(sorted(per_category.items(), key=lambda kv: -kv[1])),
          "top_ops": [{"op": op, "ms": ms, "op_name": names.get(op, "")[-160:]} for op, ms in top],
          "busy_ms": busy, "idle_ms": max(step_time * 1e3 - busy, 0.0), "steps": steps,
          "events": len(events), "source": "device" if on_device else "host threads"}


# ------------------------------------------------------------------ the peer

def config_args(argv: list[str]) -> list[str]:
  """The --config and --config.a.b=value arguments of a command line, in order."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith(("--config.", "--config=", "--noconfig.")) or arg == "--config":
      out.append(arg)
      # absl also takes `--flag value` (a bare boolean `--config.a.b` takes no value).
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        out.append(argv[i + 1])
  return out


def torch_importable() -> bool:
  import importlib.util
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def run_peer(argv: list[str], steps: int, warmup: int, compile_peer: bool,
             precision: str) -> dict:
  """Runs benchmarks/peer_torch.py with this command's config; its result record, or why not.

  Run before JAX starts on the GPU: JAX takes most of the device memory when it starts.
  """
  if not torch_importable():
    return {"skipped": "torch and transformers are not importable in this Python "
                       f"({sys.executable}); `pip install torch transformers` to compare"}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "peer.json")
    args = [*config_args(argv), f"--steps={steps}", f"--warmup={warmup}",
            f"--precision={precision}", "--compile" if compile_peer else "--nocompile"]
    command = [sys.executable, PEER, *args, f"--json={out}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if not os.path.exists(out):  # a record is written also when the model does not fit
      return {"failed": f"exit status {proc.returncode}", "command": shlex.join(command),
              "stderr": proc.stderr[-3000:]}
    with open(out) as f:
      record = json.load(f)
    # The command to repeat it, without this run's temporary --json.
    record["command"] = shlex.join(["python", "benchmarks/peer_torch.py", *args])
    return record


def add_peer(result: dict, peers: list[dict]) -> None:
  """Puts the peer's runs into the result: `peer` (its first run, with every round's tokens/s),
  `ratio` (the median over rounds of our tokens/s over the peer's, each pair timed back to back)
  and each round's figures beside ours in `rounds`."""
  peer = result["peer"] = peers[0]
  if not (result.get("fits") and all("tokens_per_sec" in p for p in peers)):
    return
  peer["tokens_per_sec_rounds"] = [p["tokens_per_sec"] for p in peers]
  if result["ceilings"]:  # the same device's ceiling, measured by this run
    matmul = result["ceilings"]["matmul"]["tflops"]
    peer["mfu_of_matmul_ceiling"] = {k: v / matmul for k, v in peer["tflops_per_device"].items()}
  rounds = result.get("rounds") or []
  if len(rounds) != len(peers):  # one peer run before JAX started (a GPU), one JAX round
    result["ratio"] = result["tokens_per_sec"] / peer["tokens_per_sec"]
    return
  for ours, theirs in zip(rounds, peers):
    ours.update(peer_tokens_per_sec=theirs["tokens_per_sec"],
                peer_step_median=theirs["step_time"]["median"],
                peer_loadavg_before=theirs["loadavg_before"],
                ratio=ours["tokens_per_sec"] / theirs["tokens_per_sec"])
  result["ratio"] = float(np.median([r["ratio"] for r in rounds]))


# ------------------------------------------------------------------ the report

def _pct(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def format_report(r: dict) -> str:
  """The human summary of a result record (the JSON has everything)."""
  cuda = ", ".join(f"{k} {v}" for k, v in r.get("cuda", {}).items())
  lines = [
      f"command: {r['command']}",
      f"device: {r['devices']} x {r['device_kind']} ({r['platform']}); jax {r['jax']}, "
      f"jaxlib {r['jaxlib']}" + (f"; {cuda}" if cuda else ""),
      f"XLA_FLAGS={r['xla_flags']!r}" + (" (from launch/gpu_env.sh)" if r.get("gpu_env") else ""),
      f"model: {r['size']}, {(r.get('params') or 0) / 1e6:,.1f}M params, batch {r['batch_size']} "
      f"x {r['seq_len']}, {r['dtype']} compute / {r['param_dtype']} params, attention "
      f"{r['attention']}, scan {'on' if r['scan_layers'] else 'off'}, remat {r['remat_policy']}, "
      f"logits_chunk {r['logits_chunk']}",
  ]
  c = r.get("ceilings")
  if c:
    lines.append(f"ceilings (this device): matmul {c['matmul']['n']}^3 {c['matmul']['dtype']} "
                 f"{c['matmul']['tflops']:.3g} TFLOP/s; copy {c['copy']['bytes'] / 2 ** 20:,.0f} "
                 f"MiB {c['copy']['gbps']:.4g} GB/s (read + write)")
  if not r.get("fits", True):
    lines.append(f"does not fit: {r['error']}")
    return "\n".join(lines)
  s, t = r["step_time"], r["tflops_per_device"]
  estimate = r.get("memory_estimate_bytes")
  lines += [
      f"compile: {r['compile_seconds']:.1f} s" + (
          f"; compiler's memory estimate {estimate / GiB:.2f} GiB" if estimate else ""),
      f"step time: median {s['median'] * 1e3:.2f} ms (p10 {s['p10'] * 1e3:.2f}, p90 "
      f"{s['p90'] * 1e3:.2f}) over {s['n']} steps after {r['warmup']} warm-up; "
      f"{s['pipelined_mean'] * 1e3:.2f} ms without per-step syncs",
      f"tokens/s: {r['tokens_per_sec']:,.0f}; TFLOP/s per device: {t['palm']:.4g} "
      f"(causal {t['causal']:.4g})",
      f"MFU: {_pct(r['mfu'] and r['mfu']['palm'])} (causal {_pct(r['mfu'] and r['mfu']['causal'])})"
      + ("" if r["peak_flops_per_device"] else f" -- no data-sheet peak for {r['device_kind']}")
      + (f"; of the measured matmul ceiling: {r['mfu_of_matmul_ceiling']['palm']:.1%} (causal "
         f"{r['mfu_of_matmul_ceiling']['causal']:.1%})" if r.get("mfu_of_matmul_ceiling") else ""),
      f"loss: {r['loss']['first']:.4f} -> {r['loss']['last']:.4f}"
      + ("" if r["loss"]["finite"] else " (NOT FINITE)"),
  ]
  b = r.get("breakdown")
  if b and "error" in b:
    lines.append(f"breakdown: {b['error']}")
  elif b:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in b["ms_per_step"].items())
    lines.append(f"breakdown (ms per step, {b['source']}, {b['steps']} traced steps): {parts}; "
                 f"idle {b['idle_ms']:.2f} of {s['median'] * 1e3:.2f}")
    for op in b.get("top_ops", [])[:8]:
      lines.append(f"  {op['ms']:8.2f} ms  {op['op']}  {op['op_name'][-100:]}")
  for i, rnd in enumerate(r.get("rounds") or []):
    if len(r["rounds"]) == 1 and "ratio" not in rnd:
      break
    line = f"round {i + 1}: jax {rnd['tokens_per_sec']:,.0f} tokens/s ({rnd['step_median'] * 1e3:.1f} ms)"
    load_from = rnd["loadavg_before"][0]
    if "ratio" in rnd:  # the peer ran just before this round
      line += (f", peer {rnd['peer_tokens_per_sec']:,.0f} tokens/s "
               f"({rnd['peer_step_median'] * 1e3:.1f} ms), jax / peer {rnd['ratio']:.2f}x")
      load_from = rnd["peer_loadavg_before"][0]
    lines.append(f"{line}; load average {load_from:.2f} -> {rnd['loadavg_after'][0]:.2f} "
                 f"({r.get('cpus', '?')} CPUs)")
  peer = r.get("peer")
  if peer and "tokens_per_sec" in peer:
    lines.append(f"peer: {peer['framework']} {peer['torch']} ({peer['model_class']}, "
                 f"{peer['precision']}, compile {peer['compiled']}): {peer['tokens_per_sec']:,.0f} "
                 f"tokens/s, step {peer['step_time']['median'] * 1e3:.2f} ms, MFU "
                 f"{_pct(peer['mfu'] and peer['mfu']['palm'])}; jax / peer = "
                 f"{r['ratio']:.2f}x" + (f" (median of {len(r['rounds'])} alternating rounds)"
                                         if len(r.get("rounds") or []) > 1 else ""))
  elif peer:
    why = peer.get("skipped") or peer.get("failed") or f"does not fit: {peer.get('error')}"
    lines.append(f"peer: not run: {why}" + (f"\n{peer['stderr']}" if peer.get("stderr") else ""))
  return "\n".join(lines)


# ------------------------------------------------------------------ command

def define_flags():
  """The command's flags; defined only when run as a command, so that importing this module
  beside foundation.train (which defines --config too) stays possible."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 30, "Timed steps (after the warm-up).")
  flags.DEFINE_integer("warmup", 5, "Untimed steps first: compilation, autotuning, allocation.")
  flags.DEFINE_string("json", "", "Also write the result record to this JSON file.")
  flags.DEFINE_bool("ceilings", True, "Measure the device's matmul and copy ceilings too.")
  flags.DEFINE_integer("profile", 0, "Trace this many more steps (jax.profiler) and report the "
                       "device time per part of the model: attention, MLP, norms, optimizer, idle.")
  flags.DEFINE_float("memory_limit_gib", 0.0, "Fit in this much memory per device (0: what the "
                     "device reports), e.g. 80 to ask about an H100 on a larger GPU.")
  flags.DEFINE_bool("gpu_env", True, "On a GPU, apply launch/gpu_env.sh (XLA flags) first.")
  flags.DEFINE_bool("peer", False, "Also run benchmarks/peer_torch.py (PyTorch, same shape).")
  flags.DEFINE_integer("rounds", 1, "Time the steps this many times; with --peer on a CPU the peer "
                       "runs before each, alternating, and the ratio is the median of the rounds' "
                       "(robust to a shared machine's changing load). On a GPU only 1: JAX holds "
                       "the memory the peer would need.")
  flags.DEFINE_bool("peer_compile", True, "torch.compile the peer (slow to start on a CPU).")
  flags.DEFINE_enum("peer_precision", "same", ["same", "bf16"],
                    "same: the config's compute/param dtypes (autocast); bf16: bf16 params too.")


def main(argv):
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  if args.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/lm.py:size=test")
  if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
    raise app.UsageError(f"--steps={args.steps} and --rounds={args.rounds} must be >= 1 and "
                         f"--warmup={args.warmup} >= 0")
  on_gpu = cuda_plugin_installed()
  if args.peer and on_gpu and args.rounds > 1:
    raise app.UsageError(f"--rounds={args.rounds} with --peer alternates the peer with JAX, which "
                         f"on a GPU holds the memory the peer needs: use --rounds=1 there")
  logging.set_verbosity(logging.ERROR)
  gpu_env = apply_gpu_env() if args.gpu_env and on_gpu else {}
  peers = []

  def one_peer(_round=0):
    load = os.getloadavg()
    peers.append(run_peer(sys.argv[1:], args.steps, args.warmup, args.peer_compile,
                          args.peer_precision))
    peers[-1].update(loadavg_before=list(load), loadavg_after=list(os.getloadavg()))

  try:
    config_lib.check_values(args.config)
    if args.peer and on_gpu:
      one_peer()  # before JAX starts on the GPU: JAX takes most of the device memory
    result = bench(args.config, args.steps, args.warmup, args.ceilings, args.profile,
                   int(args.memory_limit_gib * GiB) or None, rounds=args.rounds,
                   before_round=one_peer if args.peer and not on_gpu else None)
  except config_lib.ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  result["command"] = "python -m foundation.bench " + shlex.join(sys.argv[1:])
  result["gpu_env"] = gpu_env
  if peers:
    add_peer(result, peers)
  if jax.process_index() == 0:
    print(format_report(result), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
  if not result.get("fits"):
    sys.exit(3)  # a sweep over sizes reads this as "does not fit"


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
