r"""Will it fit? Compiles the sharded train step ahead of time for a TPU topology, on a CPU machine.

  pip install 'jax[tpu]==<your jax version>'   # libtpu from PyPI; no TPU needed
  python -m foundation.compile --config configs/lm.py:size=70b --topology 'TPU v5 lite:16x16' \
      [--config.mesh.tensor=8 --config.model.remat_policy=full ...]

Prints per-chip bytes for params, optimizer state, the batch and activations/temporaries, the
total against the chip's HBM ("fits" or "does not fit, by N GiB"), and the FLOPs per step.
`--topology cpu` compiles for this machine's own devices instead (no libtpu needed).
"""

import json
import os
import shlex
import sys

# libtpu must find a "worker" to describe a topology without a TPU; set before jax initialises.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compile-only: no chip is attached, so several of these processes may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from foundation import build as build_lib
from foundation import config as config_lib
from foundation import mesh as mesh_lib


GiB = 1024 ** 3
# HBM per chip, from the Cloud TPU system-architecture pages (v4: 32 GiB; v5e: 16 GiB;
# v5p: 95 GiB; v6e: 32 GiB).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB,
             "TPU v6 lite": 32 * GiB}


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a named TPU topology (described by libtpu, not attached), or this machine's."""
  if topology == "cpu":
    return jax.devices()
  try:
    from jax.experimental import topologies
    # v4 chips have two TensorCores that programs use as one device ("megacore").
    chip_config = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
    description = topologies.get_topology_desc(topology, "tpu", num_slices=num_slices,
                                               **chip_config)
  except Exception as e:  # libtpu missing, or an unknown topology name
    raise config_lib.ConfigError(
        f"cannot describe TPU topology {topology!r}: {e}. It needs libtpu: pip install "
        f"'jax[tpu]=={jax.__version__}'; names look like 'v5p:8x8x8', 'TPU v5 lite:4x4', "
        f"'v4:2x2x2'") from None
  return list(description.devices)


def hbm_bytes(device_kind: str) -> int | None:
  for name in sorted(HBM_BYTES, key=len, reverse=True):
    if device_kind.startswith(name):
      return HBM_BYTES[name]
  return None


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def compile_train_step(config, devices):
  """(compiled train step, abstract state, abstract batch, mesh) for `devices`."""
  config_lib.validate(config, devices, process_count=1)
  built = build_lib.build(config, devices)
  abstract_state, abstract_batch, mesh = built.abstract_state, built.abstract_batch(), built.mesh
  train_step, _ = built.jit_steps()
  with built.context():
    lowered = train_step.lower(abstract_state, abstract_batch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses programs that cannot fit; that is an answer, not a crash.
    raise DoesNotFit(str(e).splitlines()[0], built) from None
  return compiled, built


class DoesNotFit(Exception):
  """The compiler found the step too big for the device memory (its message says by how much)."""

  def __init__(self, message, built):
    super().__init__(message)
    self.built = built


def fit_report(config, devices) -> dict:
  """Per-device memory of one train step, and whether it fits the device's memory."""
  try:
    compiled, built = compile_train_step(config, devices)
  except DoesNotFit as e:
    return _refused_report(config, devices, e)
  abstract_state, mesh = built.abstract_state, built.mesh
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kind = devices[0].device_kind
  # Donation aliases the new state onto the old: count that memory once.
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes)
  capacity = hbm_bytes(kind)
  return {
      **_run_fields(config, built), "device_kind": kind, "devices": len(devices),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "layout": mesh_lib.describe(mesh, config.mesh),
      "bytes": {
          "params": bytes_per_device(abstract_state["params"]),
          "optimizer_state": bytes_per_device(abstract_state["opt_state"]),
          "batch": bytes_per_device(built.abstract_batch()),
          "temporaries": int(memory.temp_size_in_bytes),
          "arguments": int(memory.argument_size_in_bytes),
          "outputs_not_aliased": int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
          "code": int(memory.generated_code_size_in_bytes),
          "total": int(total),
      },
      "hbm_bytes": capacity,
      "fits": None if capacity is None else total <= capacity,
      "compiled_flops_per_device": float(cost.get("flops", float("nan"))) if cost else None,
  }


def _run_fields(config, built) -> dict:
  """What the report says of the run: size, shape of a batch, params, the task's FLOPs."""
  task = built.task
  return {"size": config.get("size", config.model.get("family", "?")),
          "remat_policy": config.model.get("remat_policy", "none"),
          "logits_chunk": config.model.get("logits_chunk", 0),
          "batch_size": config.batch_size, "grad_accum": config.grad_accum,
          # the per-example length the report prints: tokens, patches (1 for plain examples)
          "seq_len": task.units_per_example(), "unit": task.unit,
          "params": count_params(built.abstract_state["params"]),
          "model_flops_per_step": built.flops_per_step()}


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _refused_report(config, devices, refusal: DoesNotFit) -> dict:
  """What is known when the compiler refuses: the state's share, and the compiler's own words."""
  built = refusal.built
  state = built.abstract_state
  return {
      **_run_fields(config, built), "device_kind": devices[0].device_kind,
      "devices": len(devices),
      "mesh": {k: int(v) for k, v in built.mesh.shape.items()},
      "layout": mesh_lib.describe(built.mesh, config.mesh),
      "bytes": {"params": bytes_per_device(state["params"]),
                "optimizer_state": bytes_per_device(state["opt_state"]),
                "batch": bytes_per_device(built.abstract_batch())},
      "hbm_bytes": hbm_bytes(devices[0].device_kind), "fits": False,
      "compiler_refused": str(refusal),
  }


def _libtpu_version() -> str | None:
  try:
    from importlib import metadata
    return metadata.version("libtpu")
  except Exception:  # not installed (a --topology cpu run)
    return None


def format_report(report: dict, topology: str) -> str:
  b = {k: v / GiB for k, v in report["bytes"].items()}
  mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
  if report.get("compiler_refused"):
    return "\n".join([
        f"{report['size']} on {topology}: {report['devices']} x {report['device_kind']}, mesh "
        f"{mesh}, remat {report['remat_policy']}, batch {report['batch_size']} x "
        f"{report['seq_len']} {report.get('unit', 'tokens')}", report["layout"],
        f"per device: params {b['params']:.2f} GiB, optimizer state "
        f"{b['optimizer_state']:.2f} GiB",
        f"does not fit: the compiler refused it: {report['compiler_refused']}"])
  lines = [
      f"{report['size']} ({report['params'] / 1e6:,.1f}M params) on {topology}: "
      f"{report['devices']} x {report['device_kind']}, mesh {mesh}, remat "
      f"{report['remat_policy']}, batch {report['batch_size']} x {report['seq_len']} "
      f"{report.get('unit', 'tokens')}",
      report["layout"],
      f"per device: params {b['params']:.2f} GiB, optimizer state {b['optimizer_state']:.2f} GiB, "
      f"batch {b['batch']:.3f} GiB, activations/temporaries {b['temporaries']:.2f} GiB, "
      f"total {b['total']:.2f} GiB",
      f"FLOPs per step: {report['compiled_flops_per_device']:.3g} per device (compiled), "
      f"{report['model_flops_per_step']:.3g} in all (the task's formula)",
  ]
  if report["hbm_bytes"]:
    hbm = report["hbm_bytes"] / GiB
    lines.append(f"fits: {b['total']:.2f} of {hbm:.0f} GiB HBM ({hbm - b['total']:.2f} GiB free)"
                 if report["fits"] else
                 f"does not fit, by {b['total'] - hbm:.2f} GiB ({b['total']:.2f} GiB needed, "
                 f"{hbm:.0f} GiB HBM per chip)")
  return "\n".join(lines)


def define_flags():
  """The command's flags; defined only when run as a command, so that importing this module
  beside foundation.train (which defines --config too) stays possible."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_string("topology", "cpu", "A TPU topology such as 'v5p:8x8x8', 'TPU v5 lite:4x4', "
                      "'v4:2x2x2', or 'cpu' for this machine's devices.")
  flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice).")
  flags.DEFINE_string("json", "", "Also write the report to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)
  args = flags.FLAGS
  try:
    devices = topology_devices(args.topology, args.num_slices)
    report = fit_report(args.config, devices)
  except config_lib.ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  report["topology"] = args.topology
  report["jax"] = jax.__version__
  report["libtpu"] = _libtpu_version()
  report["command"] = "python -m foundation.compile " + shlex.join(sys.argv[1:])
  print(format_report(report, args.topology))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
