"""The device mesh, logical-axis rules and shardings; multi-host start-up.

Mesh axes are `data`, `fsdp`, `sequence` and `tensor`. Each has an in-slice (ici) degree, `config.mesh.<axis>`,
and an across-slice (dcn) degree, `config.mesh.dcn_<axis>`; one degree of each kind may be -1 to fill
what the others leave. The logical-axis rules (`config.mesh.rules`) map the names that the model puts
on params and activations (`embed`, `heads`, `mlp`, ...) to these mesh axes.
"""

import math
import os

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "sequence", "tensor")


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run when the environment asks for it.

  `launch/` scripts set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on TPU pods,
  SLURM and Open MPI, JAX finds its peers from the scheduler's own variables.
  """
  if os.environ.get("JAX_NUM_PROCESSES"):
    # CPU processes need gloo for cross-process collectives; the setting is ignored on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or
        int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or
        "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()


def _fill(degrees: dict[str, int], total: int, what: str) -> dict[str, int]:
  """Replaces a -1 degree by what makes the product `total`; errors name the fields and numbers."""
  fill = [k for k, v in degrees.items() if v == -1]
  bad = [f"{k}={v}" for k, v in degrees.items() if v == 0 or v < -1]
  if bad:
    raise ValueError(f"{what}: degrees must be positive or -1 (fill); got {', '.join(bad)}")
  if len(fill) > 1:
    raise ValueError(f"{what}: only one degree may be -1, got -1 for {', '.join(fill)}")
  known = math.prod(v for v in degrees.values() if v != -1)
  formula = " * ".join(f"{k}={v}" for k, v in degrees.items())
  if fill:
    if total % known:
      raise ValueError(f"{what}: {formula} cannot fill {total} devices: {total} is not divisible "
                       f"by {known}")
    degrees = {**degrees, fill[0]: total // known}
  elif known != total:
    raise ValueError(f"{what}: {formula} = {known}, but there are {total} devices; make the "
                     f"product {total} or set one degree to -1 to fill")
  return degrees


def _has_slices(devices) -> bool:
  """TPU chips are joined by ICI across hosts within a slice; other devices only within a host."""
  return devices[0].platform == "tpu"


def num_slices(devices) -> int:
  """Number of slices: TPU slices, or else hosts (processes), joined by the data-centre network.

  GPU and CPU devices carry no slice index; their fast interconnect ends at the host, so each
  process is one slice (granule) of the mesh.
  """
  if _has_slices(devices):
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})
  return len({d.process_index for d in devices})


def mesh_shape(mesh_config, devices) -> tuple[dict[str, int], dict[str, int]]:
  """The ici and dcn degree of each mesh axis for these devices, -1s resolved."""
  slices = num_slices(devices)
  per_slice = len(devices) // slices
  ici = _fill({f"mesh.{a}": mesh_config[a] for a in AXES}, per_slice,
              f"mesh (in-slice, {per_slice} devices per slice, {slices} slice(s))")
  dcn = _fill({f"mesh.dcn_{a}": mesh_config[f"dcn_{a}"] for a in AXES}, slices,
              f"mesh (across slices, {slices} slice(s))")
  return ({a: ici[f"mesh.{a}"] for a in AXES}, {a: dcn[f"mesh.dcn_{a}"] for a in AXES})


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Builds the (data, fsdp, sequence, tensor) mesh; axis types are Auto (pjit-style sharding)."""
  devices = jax.devices() if devices is None else devices
  ici, dcn = mesh_shape(mesh_config, devices)
  ici_shape = [ici[a] for a in AXES]
  dcn_shape = [dcn[a] for a in AXES]
  if math.prod(dcn_shape) == 1:
    device_array = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  else:
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=not _has_slices(devices),
        allow_split_physical_axes=True)
  return Mesh(device_array, AXES)


def describe(mesh: Mesh, mesh_config) -> str:
  """One line for the log: each axis's size, and its in-slice x across-slice split where it has one."""
  devices = list(mesh.devices.flat)
  ici, dcn = mesh_shape(mesh_config, devices)
  axes = ", ".join(f"{a}={mesh.shape[a]}" + (f" ({ici[a]} in-slice x {dcn[a]} across)"
                                             if dcn[a] > 1 else "") for a in AXES)
  return (f"mesh ({axes}) over {len(devices)} {devices[0].platform} devices, "
          f"{num_slices(devices)} slice(s), {jax.process_count()} process(es)")


def rules(config) -> tuple:
  """The config's logical-axis rules as Flax expects them: ((name, mesh axes or None), ...)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.rules)


def logical_to_sharding(logical_specs, mesh: Mesh, axis_rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def also_split_over(sharding: NamedSharding, shape, axis: str) -> NamedSharding:
  """`sharding`, further split over mesh `axis` on the first dimension that divides evenly.

  ZeRO-1 uses it for the optimizer state: each data-parallel replica keeps 1/n of the Adam
  moments. Arrays with no such dimension (scalars, small vectors) stay as they were.
  """
  mesh, spec = sharding.mesh, list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  if mesh.shape[axis] == 1 or any(axis in ((p,) if isinstance(p, str) else p or ()) for p in spec):
    return sharding
  for i, (dim, part) in enumerate(zip(shape, spec)):
    axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
    if dim % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
      spec[i] = (axis, *axes) if axes else axis
      return NamedSharding(mesh, P(*spec))
  return sharding


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  """How a [batch, length] input batch is laid out: batch split over the data-parallel axes."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), axis_rules))


def batch_shardings(mesh: Mesh, axis_rules, spec: dict) -> dict[str, NamedSharding]:
  """{key: sharding} of a task's batch: each key's logical axes (its `Field.axes`: tokens
  ('batch', 'length'), images ('batch', 'height', 'width', 'channels'), labels ('batch',)) mapped
  by the rules; names without a rule stay whole."""
  return {k: NamedSharding(mesh, nn.logical_to_mesh_axes(f.axes, axis_rules))
          for k, f in spec.items()}


def data_parallel_degree(mesh: Mesh, axis_rules) -> int:
  """How many ways the batch dimension is split."""
  spec = nn.logical_to_mesh_axes(("batch",), axis_rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
  """Assembles each host's numpy part into one global jax.Array per field.

  sharding: {key: NamedSharding} (`batch_shardings`), or one [batch, length] sharding whose
  leading axes per-row fields ([batch]: a classifier's labels) take.
  """
  if isinstance(sharding, dict):
    return {k: jax.make_array_from_process_local_data(sharding[k], v)
            for k, v in local_batch.items()}
  return {k: jax.make_array_from_process_local_data(for_rank(sharding, v.ndim), v)
          for k, v in local_batch.items()}


def for_rank(sharding: NamedSharding, ndim: int) -> NamedSharding:
  """The [batch, length] sharding cut to an array of rank `ndim` (1: per-row fields)."""
  if ndim >= len(sharding.spec):
    return sharding
  return NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:ndim]))
