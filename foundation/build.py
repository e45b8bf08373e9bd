"""build(config): the mesh, rules, family, model, task, optimizer and state shardings of a run, made
once. train, bench, compile, hf, generate and evaluate all start here.

  built = build.build(config)                  # devices: jax.devices() unless given
  state = built.init_state()                   # born sharded, from config.seed
  train_step, eval_step = built.jit_steps()
  with built.context():                        # the mesh and the logical-axis rules
    state, metrics = train_step(state, batch)

Nothing here knows a family or a task by name: the registry finds them (foundation/registry.py).
"""

import dataclasses
from typing import Any

import jax
import optax

from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib


@dataclasses.dataclass
class Built:
  """What a run is made of, before any state exists."""
  config: Any
  mesh: jax.sharding.Mesh
  family: Any                      # the registry's family class (model.family)
  model: Any                       # the flax module
  task: Any                        # the task object (config.task)
  optimizer: optax.GradientTransformation
  abstract_state: dict             # jax.ShapeDtypeStruct leaves, shardings attached
  state_shardings: dict            # NamedSharding leaves
  batch_shardings: dict            # {batch key: NamedSharding}

  @property
  def rules(self):
    return mesh_lib.rules(self.config)

  def context(self):
    """The context every traced call runs in: the mesh and the logical-axis rules."""
    return step_lib.sharding_context(self.config, self.mesh)

  def init_state(self):
    """A fresh train state from config.seed, created directly in its shardings."""
    return step_lib.init_state(self.model, self.optimizer, self.config, self.mesh,
                               self.state_shardings)

  def jit_steps(self):
    """(train_step, eval_step), jitted with the state's and the batch's shardings."""
    return step_lib.jit_steps(self.model, self.optimizer, self.config, self.mesh,
                              self.state_shardings, self.task)

  def abstract_batch(self, batch_size: int | None = None) -> dict:
    """The global batch as ShapeDtypeStructs with shardings (AOT compiles, benchmarks)."""
    batch_size = batch_size or self.config.batch_size
    return {k: jax.ShapeDtypeStruct((batch_size, *f.shape), f.dtype,
                                    sharding=self.batch_shardings[k])
            for k, f in self.task.batch_spec().items()}

  def global_batch(self, local_batch: dict) -> dict:
    """This host's numpy batch -> the global batch of jax.Arrays, laid out for the step."""
    return mesh_lib.make_global_batch(local_batch, self.batch_shardings)

  def flops_per_step(self) -> float:
    return self.task.flops_per_example(self.model) * self.config.batch_size


def build(config, devices=None, mesh=None) -> Built:
  """Everything but the state. `config` must have passed config.validate for these devices."""
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh, devices)
  family = step_lib.family(config)
  model = family.make_model(config)
  task = step_lib.make_task(config)
  optimizer = optim.make_optimizer(config)
  abstract_state, state_shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  return Built(config=config, mesh=mesh, family=family, model=model, task=task,
               optimizer=optimizer, abstract_state=abstract_state,
               state_shardings=state_shardings,
               batch_shardings=step_lib.batch_shardings(config, mesh, task))
